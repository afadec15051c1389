{{/* Names and labels, in the shape `helm create` uses. */}}
{{- define "omnipose.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "omnipose.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "omnipose.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "omnipose.selectorLabels" -}}
app.kubernetes.io/name: {{ include "omnipose.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "omnipose.labels" -}}
helm.sh/chart: {{ include "omnipose.chart" . }}
{{ include "omnipose.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference
{{- end }}

{{- define "omnipose.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "omnipose.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest; the tag defaults to <appVersion>-<flavor>. */}}
{{- define "omnipose.image" -}}
{{- $image := .Values.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default (printf "%s-%s" .Chart.AppVersion $image.flavor) $image.tag) }}
{{- end }}
{{- end }}

{{/* Path of the checkpoint inside the container when a weights mode provides one. */}}
{{- define "omnipose.weightsFile" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.weights.mountPath) .Values.weights.fileName }}
{{- end }}

{{/*
One setting as an env var value. Helm reads YAML numbers as float64, which print as 4e+07;
toJson prints them in full (40000000, 0.25) and prints booleans as true/false. Strings as-is.
*/}}
{{- define "omnipose.envValue" -}}
{{- if kindIs "string" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* settings with the weights path filled in by the weights mode; nulls dropped. */}}
{{- define "omnipose.effectiveSettings" -}}
{{- $settings := dict }}
{{- range $key, $value := .Values.settings }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $settings $key $value }}
{{- end }}
{{- end }}
{{- if and (ne .Values.weights.mode "none") (not (hasKey $settings "weights")) }}
{{- $_ := set $settings "weights" (include "omnipose.weightsFile" .) }}
{{- end }}
{{- if and .Values.auth.existingSecret (not (hasKey $settings "api_keys_file")) }}
{{- $_ := set $settings "api_keys_file" (printf "%s/%s" .Values.auth.mountPath .Values.auth.key) }}
{{- end }}
{{- if .Values.tls.existingSecret }}
{{- if not (hasKey $settings "tls_cert_file") }}
{{- $_ := set $settings "tls_cert_file" (printf "%s/tls.crt" .Values.tls.mountPath) }}
{{- $_ := set $settings "tls_key_file" (printf "%s/tls.key" .Values.tls.mountPath) }}
{{- end }}
{{- if and .Values.tls.clientCA (not (hasKey $settings "grpc_tls_client_ca_file")) }}
{{- $_ := set $settings "grpc_tls_client_ca_file" (printf "%s/ca.crt" .Values.tls.mountPath) }}
{{- end }}
{{- end }}
{{- toJson $settings }}
{{- end }}

{{/* Fail early on combinations a schema cannot express. */}}
{{- define "omnipose.validate" -}}
{{- $settings := .Values.settings }}
{{- if and .Values.tls.existingSecret (eq .Values.probes.mode "grpc") }}
{{- fail "probes.mode grpc cannot probe a TLS port (the kubelet's gRPC probe has no TLS): use probes.mode http with tls.existingSecret" }}
{{- end }}
{{- if and .Values.tls.clientCA (not .Values.tls.existingSecret) }}
{{- fail "tls.clientCA needs tls.existingSecret (a Secret with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- $grace := add (int (ceil (default 30 $settings.shutdown_grace_s))) (int .Values.lifecycle.preStopSleepSeconds) }}
{{- if le (int .Values.terminationGracePeriodSeconds) $grace }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed settings.shutdown_grace_s + lifecycle.preStopSleepSeconds (%d), or in-flight requests are killed on shutdown" (int .Values.terminationGracePeriodSeconds) $grace) }}
{{- end }}
{{- if eq (int (default 8000 $settings.http_port)) (int (default 50051 $settings.grpc_port)) }}
{{- fail "settings.http_port and settings.grpc_port must differ" }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- $cpu := not (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage) }}
{{- if and (not $cpu) (not .Values.autoscaling.customMetric.enabled) }}
{{- fail "autoscaling.enabled needs targetCPUUtilizationPercentage or customMetric.enabled" }}
{{- end }}
{{- if and $cpu (not (dig "requests" "cpu" "" .Values.resources)) }}
{{- fail "autoscaling on CPU utilization needs resources.requests.cpu" }}
{{- end }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- end }}
{{- if .Values.podDisruptionBudget.enabled }}
{{- $min := not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable) }}
{{- $max := not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable) }}
{{- if eq $min $max }}
{{- fail "podDisruptionBudget: set exactly one of minAvailable and maxUnavailable" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
One probe: HTTP GET on the http port, or (probes.mode grpc, readiness and startup only) the native
gRPC health probe. The server's grpc.health.v1 status is NOT_SERVING until the model is warmed and
again while draining, i.e. it reports readiness; liveness therefore always uses GET /healthz.
*/}}
{{- define "omnipose.probe" -}}
{{- $root := .root }}
{{- $settings := fromJson (include "omnipose.effectiveSettings" $root) }}
{{- if and (eq $root.Values.probes.mode "grpc") (not .liveness) }}
grpc:
  port: {{ int $settings.grpc_port }}
  {{- with $root.Values.probes.grpcService }}
  service: {{ . | quote }}
  {{- end }}
{{- else }}
httpGet:
  path: {{ .path }}
  port: http
  {{- if $settings.tls_cert_file }}
  scheme: HTTPS
  {{- end }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}
