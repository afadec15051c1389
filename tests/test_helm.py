"""The Helm chart, rendered by a real Helm engine and validated against Kubernetes' schemas.

Helm runs in-process through ``helm-python-sdk`` (Helm v4's Go SDK behind a C ABI): lint, schema
validation and offline rendering, no cluster and no ``helm`` binary. Every rendered object is then
validated with ``kubernetes-validate`` against a pinned Kubernetes version (strict: unknown fields
fail). The ServiceMonitor is a CRD those schemas do not know; its fields are checked by hand.

``python tests/test_helm.py --write-schema`` regenerates the ``settings`` part of
values.schema.json after ServiceSettings changes (the test below says when that is needed).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # for `python tests/test_helm.py --write-schema`
    sys.path.insert(0, str(REPO))

from omnipose.service.metrics import ServiceMetrics  # noqa: E402
from omnipose.service.settings import ServiceSettings  # noqa: E402

CHART = REPO / "helm" / "omnipose"
VARIANTS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
# Oldest Kubernetes we claim (autoscaling/v2, native gRPC probes GA, PDB policy/v1) and the newest
# minor the installed kubernetes-validate ships.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
RELEASE = "omnipose"
NAMESPACE = "vision"
# Settings the chart itself reads (ports, grace period): they may not be removed (null).
CHART_REQUIRED_SETTINGS = ["host", "http_port", "grpc_port", "shutdown_grace_s"]
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor")}
SEVERITY_WARNING = 2


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _strip_docs(node: Any) -> Any:
    """Drop the keys that document rather than constrain (they change with every wording edit)."""
    if isinstance(node, dict):
        return {
            k: _strip_docs(v)
            for k, v in node.items()
            if k not in {"title", "description", "default", "format"}
        }
    if isinstance(node, list):
        return [_strip_docs(v) for v in node]
    return node


def settings_values_schema() -> dict[str, Any]:
    """The ``settings`` part of values.schema.json, derived from ServiceSettings' own schema.

    Types, enums and bounds come from pydantic, so Helm rejects at install time what the server
    would reject at start-up (a crash-looping pod is a worse place to learn about a typo).
    """
    source = ServiceSettings.model_json_schema()
    assert "$defs" not in source, "nested settings models: extend settings_values_schema()"
    return {
        "type": "object",
        "additionalProperties": False,
        "required": CHART_REQUIRED_SETTINGS,
        "properties": {name: _strip_docs(prop) for name, prop in source["properties"].items()},
    }


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def variant_values(variant: str) -> dict[str, Any]:
    if variant == "default":
        return {}
    return yaml.safe_load((CHART / "ci" / f"{variant}-values.yaml").read_text())


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All Kubernetes objects the chart renders for ``values`` (NOTES.txt left out)."""
    manifests = chart().render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> set[str]:
    return {o["kind"] for o in objects}


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return only(objects, "Deployment")["spec"]["template"]["spec"]


def server_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(objects)["containers"]
    return next(c for c in containers if c["name"] == "omnipose")


def configmap_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return only(objects, "ConfigMap")["data"]


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    """ServiceSettings exactly as the pod builds it: from the ConfigMap's env vars only."""
    for key in list(os.environ):
        if key.upper().startswith("OMNIPOSE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return ServiceSettings()


def dockerfile_contract() -> tuple[int, set[str], str]:
    """(uid, VOLUME paths, path of fetch_weights.py) of the cpu image, read from the Dockerfile."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    cpu_stage = text.split("AS cpu\n", 1)[1].split("\nFROM ", 1)[0]
    uid = int(re.search(r"^USER (\d+)", cpu_stage, re.MULTILINE)[1])
    volumes = set(json.loads(re.search(r"^VOLUME (\[.*\])", cpu_stage, re.MULTILINE)[1]))
    fetch = re.search(r"^COPY docker/fetch_weights.py (\S+)", cpu_stage, re.MULTILINE)[1]
    return uid, volumes, fetch


# ------------------------------------------------------------------------------------------------
# lint, schema, Kubernetes validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["default", *VARIANTS])
def test_helm_lint_is_clean(variant: str) -> None:
    report = helm.lint(
        CHART, variant_values(variant), strict=True, namespace=NAMESPACE, kube_version="v1.30.0"
    )
    problems = [m for m in report["messages"] if m["severity"] >= SEVERITY_WARNING]
    assert report["errors"] == [] and problems == [], problems or report["errors"]
    assert report["total_charts_linted"] == 1


def test_lint_reports_a_broken_values_file() -> None:
    """Lint really checks: values that violate the schema are reported as errors."""
    report = helm.lint(CHART, {"replicaCount": -3}, strict=True)
    assert any("replicaCount" in error for error in report["errors"])


@pytest.mark.parametrize("variant", ["default", *VARIANTS])
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_rendered_objects_are_valid_kubernetes(variant: str, kube_version: str) -> None:
    objects = render(variant_values(variant))
    assert {"Deployment", "Service", "ConfigMap"} <= kinds(objects)
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
            continue  # checked field by field in test_service_monitor
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")


def test_kubernetes_validation_catches_a_bad_object() -> None:
    """The validator is strict enough to matter: a misspelt probe field is rejected."""
    deployment = only(render(), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_schema_settings_are_derived_from_service_settings() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["settings"] == settings_values_schema(), (
        "values.schema.json is out of date with ServiceSettings: "
        "run `python tests/test_helm.py --write-schema`"
    )


def test_values_settings_mirror_the_service_defaults() -> None:
    """Every field is in values.yaml, with the service's own default (no silent overrides)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["settings"]
    defaults = ServiceSettings.model_construct().model_dump(mode="json")
    missing, unknown = set(defaults) - set(values), set(values) - set(defaults)
    assert not missing and not unknown, f"add {sorted(missing)}, remove {sorted(unknown)}"
    assert values == defaults


@pytest.mark.parametrize("variant", ["default", *VARIANTS])
def test_schema_accepts_every_example(variant: str) -> None:
    chart().validate_schema(variant_values(variant))


BAD_VALUES = [
    ({"replicaCount": -1}, "at '/replicaCount': minimum"),
    ({"weights": {"mode": "s3"}}, "at '/weights/mode'"),
    ({"weights": {"mode": "pvc"}}, "at '/weights/pvc/claimName'"),
    ({"weights": {"mode": "image", "image": {"repository": "r"}}}, "at '/weights/image/tag'"),
    ({"weights": {"mode": "url"}}, "at '/weights/url/url'"),
    ({"weights": {"url": {"sha256": "abc"}}}, "at '/weights/url/sha256'"),
    ({"settings": {"detector": "rcnn"}}, "at '/settings/detector'"),
    ({"settings": {"max_batchsize": 8}}, "additional properties 'max_batchsize'"),
    ({"settings": {"max_batch_size": 0}}, "at '/settings/max_batch_size': minimum"),
    ({"settings": {"detector_min_score": 1.5}}, "at '/settings/detector_min_score'"),
    ({"settings": {"http_port": None}}, "missing property 'http_port'"),
    ({"settings": {"flip_test": "yes"}}, "at '/settings/flip_test'"),
    ({"replicas": 2}, "additional properties 'replicas'"),
    ({"probes": {"mode": "tcp"}}, "at '/probes/mode'"),
    ({"gpu": {"count": 0}}, "at '/gpu/count'"),
    ({"image": {"flavor": "rocm"}}, "at '/image/flavor'"),
    ({"service": {"httpPort": 70000}}, "at '/service/httpPort'"),
    ({"autoscaling": {"customMetric": {"name": "cpu_seconds"}}}, "/customMetric/name'"),
    (
        {"autoscaling": {"customMetric": {"name": "omnipose_inflight_requests"}}},
        "at '/autoscaling/customMetric/selector': maxProperties",
    ),
    ({"autoscaling": {"customMetric": {"selector": {"pod": "x"}}}}, "properties 'pod'"),
    ({"serviceMonitor": {"interval": "often"}}, "at '/serviceMonitor/interval'"),
]


@pytest.mark.parametrize(("override", "reason"), BAD_VALUES, ids=[r for _, r in BAD_VALUES])
def test_schema_rejects_bad_values(override: dict[str, Any], reason: str) -> None:
    """Helm's own schema check refuses them, for the reason (the key) the case is about."""
    with pytest.raises(helm.HelmValuesError) as raised:
        chart().validate_schema(override)
    assert reason in str(raised.value), str(raised.value)
    with pytest.raises(helm.HelmValuesError):  # and an install would stop there too
        chart().render(override, name=RELEASE, namespace=NAMESPACE)


def test_queue_depth_selector_uses_the_metrics_real_label() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    rules = schema["properties"]["autoscaling"]["properties"]["customMetric"]["allOf"]
    queue_rule = next(
        r for r in rules if r["if"]["properties"]["name"]["const"] == "omnipose_queue_depth"
    )
    allowed = set(queue_rule["then"]["properties"]["selector"]["properties"])
    assert allowed == set(ServiceMetrics().queue_depth._labelnames)


# ------------------------------------------------------------------------------------------------
# what the Deployment must get right
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["default", *VARIANTS])
def test_configmap_env_builds_the_intended_settings(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = variant_values(variant)
    objects = render(values)
    env = configmap_env(objects)
    assert all(k.startswith("OMNIPOSE_") for k in env)
    assert {k.removeprefix("OMNIPOSE_").lower() for k in env} <= set(ServiceSettings.model_fields)
    assert all(v != "" for v in env.values()), "an empty env var is not 'unset' to pydantic"

    settings = settings_from(env, monkeypatch)
    intended = chart().merge_values(values)["settings"]
    weights_mode = chart().merge_values(values)["weights"]["mode"]
    for name, value in intended.items():
        if value is None and name == "weights" and weights_mode != "none":
            continue
        actual = getattr(settings, name)
        assert (str(actual) if isinstance(actual, Path) else actual) == value, name

    container = server_container(objects)
    assert container["envFrom"] == [
        {"configMapRef": {"name": only(objects, "ConfigMap")["metadata"]["name"]}}
    ]


@pytest.mark.parametrize("variant", ["default", *VARIANTS])
def test_probes_and_ports_follow_the_settings(variant: str) -> None:
    objects = render(variant_values(variant))
    env = configmap_env(objects)
    container = server_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(env["OMNIPOSE_HTTP_PORT"]), "grpc": int(env["OMNIPOSE_GRPC_PORT"])}

    mode = chart().merge_values(variant_values(variant))["probes"]["mode"]
    expected_paths = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/readyz",
    }
    for probe_name, path in expected_paths.items():
        probe = container[probe_name]
        if mode == "http" or probe_name == "livenessProbe":
            expected = {"path": path, "port": "http"}
            if "OMNIPOSE_TLS_CERT_FILE" in env:
                expected["scheme"] = "HTTPS"
            assert probe["httpGet"] == expected, probe_name
        else:
            assert "httpGet" not in probe and probe["grpc"]["port"] == ports["grpc"], probe_name
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "room for model load"

    service = only(objects, "Service")
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["http"]["targetPort"] == "http" and by_name["http"]["appProtocol"] == "http"
    assert by_name["grpc"]["targetPort"] == "grpc" and by_name["grpc"]["appProtocol"] == "grpc"
    annotations = only(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    if "prometheus.io/port" in annotations:
        assert int(annotations["prometheus.io/port"]) == ports["http"]


def test_ports_move_with_the_settings() -> None:
    objects = render({"settings": {"http_port": 9000, "grpc_port": 9001}})
    container = server_container(objects)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 9000,
        "grpc": 9001,
    }
    assert configmap_env(objects)["OMNIPOSE_HTTP_PORT"] == "9000"
    with pytest.raises(helm.HelmRenderError, match="must differ"):
        render({"settings": {"http_port": 9000, "grpc_port": 9000}})


def test_gpu_resources_only_when_asked() -> None:
    default = server_container(render())
    assert "nvidia.com/gpu" not in json.dumps(default["resources"])
    assert "tolerations" not in pod_spec(render())

    gpu_values = variant_values("gpu")
    objects = render(gpu_values)
    container = server_container(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["memory"] == gpu_values["resources"]["limits"]["memory"]
    spec = pod_spec(objects)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["nodeSelector"] == gpu_values["nodeSelector"]
    assert container["image"].endswith("-cuda")
    assert configmap_env(objects)["OMNIPOSE_DEVICE"] == "cuda"

    two = server_container(render({"gpu": {"enabled": True, "count": 2}}))
    assert two["resources"]["limits"]["nvidia.com/gpu"] == 2
    custom = render(
        {"affinity": {"nodeAffinity": {}}, "tolerations": [{"key": "a", "operator": "Exists"}]}
    )
    assert pod_spec(custom)["affinity"] == {"nodeAffinity": {}}
    assert "nvidia.com/gpu" not in json.dumps(server_container(custom)["resources"])


def test_pod_is_locked_down_and_matches_the_image() -> None:
    uid, image_volumes, _ = dockerfile_contract()
    objects = render()
    spec = pod_spec(objects)
    container = server_container(objects)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == uid
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["runAsUser"] == uid and security["runAsNonRoot"] is True
    assert spec["enableServiceLinks"] is False
    assert spec["automountServiceAccountToken"] is False

    # The image's writable paths are emptyDirs here (the root filesystem is read-only).
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    for path in image_volumes:
        assert path in mounts, f"{path} is written by the server but not mounted"
        assert "emptyDir" in volumes[mounts[path]]


def test_grace_period_covers_the_drain() -> None:
    values = chart().merge_values({})
    spec = pod_spec(render())
    pre_stop = server_container(render())["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop == ["sleep", str(values["lifecycle"]["preStopSleepSeconds"])]
    assert spec["terminationGracePeriodSeconds"] > (
        values["settings"]["shutdown_grace_s"] + values["lifecycle"]["preStopSleepSeconds"]
    )
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render({"terminationGracePeriodSeconds": 30})
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render({"settings": {"shutdown_grace_s": 60}})
    no_hook = server_container(render({"lifecycle": {"preStopSleepSeconds": 0}}))
    assert "lifecycle" not in no_hook


def test_autoscaling_on_cpu_and_a_custom_pods_metric() -> None:
    values = variant_values("autoscaling")
    objects = render(values)
    assert "replicas" not in only(objects, "Deployment")["spec"], "the HPA owns the replica count"
    hpa = only(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": only(objects, "Deployment")["metadata"]["name"],
    }
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["target"]["averageUtilization"] == 75
    pods = metrics["Pods"]["pods"]
    # The metric the adapter serves must be one the service really exports, as a gauge.
    service_metrics = ServiceMetrics()
    gauges = {f.name for f in service_metrics.registry.collect() if f.type == "gauge"}
    assert pods["metric"]["name"] in gauges
    assert set(pods["metric"]["selector"]["matchLabels"]) <= set(
        service_metrics.queue_depth._labelnames
    )
    assert pods["target"] == {"type": "AverageValue", "averageValue": "8"}

    assert "HorizontalPodAutoscaler" not in kinds(render())
    inflight = render(
        {
            "autoscaling": {
                "enabled": True,
                "targetCPUUtilizationPercentage": None,
                "customMetric": {
                    "enabled": True,
                    "name": "omnipose_inflight_requests",
                    "selector": None,
                },
            }
        }
    )
    (metric,) = only(inflight, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"] == {"name": "omnipose_inflight_requests"}
    with pytest.raises(helm.HelmRenderError, match=r"requests\.cpu"):
        render({"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}})
    with pytest.raises(helm.HelmRenderError, match="customMetric"):
        render({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}})


def test_pod_disruption_budget() -> None:
    objects = render()
    pdb = only(objects, "PodDisruptionBudget")
    deployment = only(objects, "Deployment")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert only(render(variant_values("autoscaling")), "PodDisruptionBudget")["spec"] == {
        "minAvailable": 1,
        "selector": deployment["spec"]["selector"],
    }
    with pytest.raises(helm.HelmRenderError, match="exactly one"):
        render({"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}})
    assert "PodDisruptionBudget" not in kinds(render({"podDisruptionBudget": {"enabled": False}}))


def test_service_monitor() -> None:
    assert "ServiceMonitor" not in kinds(render())
    values = variant_values("servicemonitor")
    objects = render(values)
    monitor = only(objects, "ServiceMonitor")
    service = only(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert values["serviceMonitor"]["labels"].items() <= monitor["metadata"]["labels"].items()
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "10s" and endpoint["scrapeTimeout"] == "5s"
    # Fields the Prometheus Operator's CRD accepts on an endpoint (v1 API).
    assert set(endpoint) <= {
        "port",
        "path",
        "scheme",
        "interval",
        "scrapeTimeout",
        "relabelings",
        "metricRelabelings",
        "honorLabels",
    }
    annotations = only(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.io/scrape" not in annotations, "no double scraping"


def test_weights_modes() -> None:
    _, _, fetch_script = dockerfile_contract()

    none = render()
    assert "OMNIPOSE_WEIGHTS" not in configmap_env(none), "unset -> embedded default"
    assert "initContainers" not in pod_spec(none)
    assert "models" not in {v["name"] for v in pod_spec(none)["volumes"]}

    pvc = render(variant_values("weights-pvc"))
    spec = pod_spec(pvc)
    volume = next(v for v in spec["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"] == {"claimName": "omnipose-weights", "readOnly": True}
    mount = next(m for m in server_container(pvc)["volumeMounts"] if m["name"] == "models")
    assert mount["readOnly"] is True
    assert configmap_env(pvc)["OMNIPOSE_WEIGHTS"] == f"{mount['mountPath']}/omnipose_w48_coco.pt"
    assert "initContainers" not in spec

    image = render(variant_values("weights-image"))
    (init,) = pod_spec(image)["initContainers"]
    assert init["image"] == "registry.example.com/omnipose-weights:w48-coco-1"
    assert init["command"] == ["cp", "/weights/pose.pt", configmap_env(image)["OMNIPOSE_WEIGHTS"]]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    volume = next(v for v in pod_spec(image)["volumes"] if v["name"] == "models")
    assert "emptyDir" in volume

    url_values = variant_values("weights-url")
    url = render(url_values)
    (init,) = pod_spec(url)["initContainers"]
    assert init["image"] == server_container(url)["image"], "downloads with the server image"
    assert init["command"][:2] == ["python", fetch_script]
    command = init["command"]
    assert command[command.index("--url") + 1] == "$(WEIGHTS_URL)"
    assert command[command.index("--sha256") + 1] == url_values["weights"]["url"]["sha256"]
    assert command[command.index("--out") + 1] == configmap_env(url)["OMNIPOSE_WEIGHTS"]
    assert init["env"] == [{"name": "WEIGHTS_URL", "value": url_values["weights"]["url"]["url"]}]

    secret = render(
        {"weights": {"mode": "url", "url": {"secretRef": {"name": "model-url", "key": "href"}}}}
    )
    (init,) = pod_spec(secret)["initContainers"]
    assert init["env"][0]["valueFrom"] == {"secretKeyRef": {"name": "model-url", "key": "href"}}

    explicit = render(
        {
            "weights": {"mode": "pvc", "pvc": {"claimName": "c"}},
            "settings": {"weights": "/models/v2/x.pt"},
        }
    )
    assert configmap_env(explicit)["OMNIPOSE_WEIGHTS"] == "/models/v2/x.pt"


def test_api_keys_and_tls_come_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The security variant mounts both Secrets read-only and points the settings at them."""
    objects = render(variant_values("security"))
    settings = settings_from(configmap_env(objects), monkeypatch)
    assert str(settings.api_keys_file) == "/etc/omnipose/auth/api-keys"
    assert str(settings.tls_cert_file) == "/etc/omnipose/tls/tls.crt"
    assert str(settings.tls_key_file) == "/etc/omnipose/tls/tls.key"
    assert str(settings.grpc_tls_client_ca_file) == "/etc/omnipose/tls/ca.crt"
    assert (settings.metrics_access, settings.docs_access) == ("auth", "off")
    mounts = {m["name"]: m for m in server_container(objects)["volumeMounts"]}
    assert mounts["api-keys"] == {"name": "api-keys", "mountPath": "/etc/omnipose/auth",
                                  "readOnly": True}
    assert mounts["tls"]["mountPath"] == "/etc/omnipose/tls" and mounts["tls"]["readOnly"]
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "omnipose-api-keys"
    assert volumes["tls"]["secret"]["secretName"] == "omnipose-tls"
    plain = render()
    assert "OMNIPOSE_API_KEYS_FILE" not in configmap_env(plain)
    assert "tls" not in {v["name"] for v in pod_spec(plain)["volumes"]}
    with pytest.raises(Exception, match="grpc cannot probe a TLS port"):
        render({"tls": {"existingSecret": "omnipose-tls"}, "probes": {"mode": "grpc"}})
    with pytest.raises(Exception, match=r"tls\.clientCA needs"):
        render({"tls": {"clientCA": True}})


def test_notes_render() -> None:
    manifests = chart().render(
        variant_values("autoscaling"), name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    notes = next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))
    assert f"kubectl -n {NAMESPACE} port-forward service/{RELEASE}" in notes
    assert "seriesQuery: 'omnipose_queue_depth" in notes
    assert "embedded default checkpoint" in notes


def test_chart_metadata() -> None:
    metadata = chart().metadata
    assert metadata["apiVersion"] == "v2" and metadata["name"] == "omnipose"
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)[1]
    assert metadata["appVersion"] == version, "image tags default to <appVersion>-<flavor>"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-schema"]:
        sys.exit(__doc__)
    schema_path = CHART / "values.schema.json"
    schema = json.loads(schema_path.read_text())
    schema["properties"]["settings"] = settings_values_schema()
    schema_path.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"updated {schema_path}")
