"""The commands README.md and the model card document work as written.

Every command of their fenced ``bash`` blocks, every ``python`` client snippet, and the
``omnipose`` commands in the model card's tables is classified here, and the test fails when a
documented command is in none of the lists (a new one cannot be ignored silently):

* ``RUN``: executed in document order in a scratch folder laid out like the repository root
  (``.venv/bin``, the ultralytics assets under ``.venv/lib``, ``model/``), against the server
  the README's ``omnipose serve`` starts. A bounded variant changes only what the entry names
  (``--images 16000`` -> ``--images 2``), each replaced text checked to be in the command.
  The server gets free ports, loopback and no warm-up through its environment
  (``OMNIPOSE_*``), so the documented command line itself is unchanged.
* ``PARSED``: ``omnipose`` commands that need data, weights, a GPU or hours (training): the
  real parser reads the command line and the training recipe loads with its overrides, which
  catches wrong argument order, unknown flags and unknown config keys.
* ``SKIPPED``: everything else, each with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.local_server import free_port
from omnipose.cli.main import build_parser, parse_arguments
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

DOCUMENTS = ("README.md", "model/weights/MODEL_CARD.md")
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.MULTILINE | re.DOTALL)
TABLE_COMMAND = re.compile(r"`((?:\.venv/bin/)?omnipose [^`]+)`")
ASSIGNMENT = re.compile(r"^([A-Z_]+)=(.*)$")
HTTP_PORT, GRPC_PORT = ":8000", ":50051"

# command -> {documented text: bounded text}; an empty dict runs the command as written
RUN: dict[str, dict[str, str]] = {
    ".venv/bin/omnipose serve": {},
    "curl -s -F image=@$BUS localhost:8000/v1/pose": {},
    "curl -s -F image=@$BUS -F 'boxes=[[50,400,200,500]]' -F flip=false localhost:8000/v1/pose": {},
    "curl -s -F image=@$BUS 'localhost:8000/v1/pose?render=true' --create-dirs -o "
    "rendered/overlay.jpg": {},
    "curl -s -H 'Content-Type: image/jpeg' --data-binary @$BUS localhost:8000/v1/pose": {},
    "curl -s -F images=@$BUS -F images=@$BUS localhost:8000/v1/pose/batch": {},
    "python: stub.Estimate(": {},
    ".venv/bin/omnipose synth --out data/video-demo --sequences 1 --kinds walk --frames 60 "
    "--seed 100": {"--frames 60": "--frames 8"},
    "python: stub.StreamEstimate(": {},
    "curl -s -F image=@data/video-demo/walk-00/frames/000001.jpg -F stream_id=cam-1 "
    "localhost:8000/v1/pose": {},
    "omnipose info coco-w8-96x64": {},
    "omnipose synth --out data/synth --images 16000 --seed 1 --split train": {
        "--images 16000": "--images 2"},
    "omnipose synth --out data/synth --images 500 --seed 20261125 --split val": {
        "--images 500": "--images 2"},
    "omnipose synth --out data/synth --images 500 --seed 20261126 --split test": {
        "--images 500": "--images 3"},
    "omnipose eval synth-w8-96x64 data.root=data/synth --weights model/weights/default.pt "
    "--split test": {},
}

PARSED: dict[str, str] = {
    ".venv/bin/omnipose predict photo.jpg --weights OmniPose_w48_coco_384x288.pth --config "
    "coco-w48-384x288 --out results.json --render out/": "the authors' W48 weights (download)",
    ".venv/bin/omnipose serve --weights w48_coco.pth --config coco-w48-384x288 --detector yolo "
    "--detector-weights yolov8n.pt --device cuda --precision fp16": "W48 and YOLO weights, a GPU",
    ".venv/bin/omnipose train coco-w48-384x288 data.root=data/coco": "COCO and a GPU",
    ".venv/bin/omnipose train coco-w48-384x288 --init imagenet hrnet_w48.pth": "ImageNet weights",
    ".venv/bin/omnipose train coco-w48-384x288 --resume runs/coco-w48-384x288/last.pt":
        "a COCO training run to resume",
    ".venv/bin/omnipose eval coco-w48-384x288 --weights runs/coco-w48-384x288/model_best.pt":
        "COCO and trained W48 weights",
    ".venv/bin/omnipose export --weights runs/coco-w48-384x288/model_best.pt --out model.pt":
        "trained W48 weights",
    ".venv/bin/omnipose synth --out data/synth-demo --images 600 --seed 11 --split train $SCENE":
        "the demo loop below: minutes of CPU training (tests/test_training.py runs that set-up)",
    ".venv/bin/omnipose synth --out data/synth-demo --images 60 --seed 12 --split val $SCENE":
        "the demo loop (tests/test_training.py)",
    ".venv/bin/omnipose train synth-w8-96x64 data.root=data/synth-demo data.rotation_prob=0 "
    "data.half_body_prob=0 data.flip=false train.batch_size=16 train.epochs=10 "
    "train.lr_steps=[8] --output-dir runs/demo": "minutes of CPU training (tests/test_training.py)",
    ".venv/bin/omnipose eval synth-w8-96x64 data.root=data/synth-demo --weights "
    "runs/demo/model_best.pt": "the demo training run's weights",
    ".venv/bin/omnipose export --weights runs/demo/model_best.pt --out runs/demo/model.pt":
        "the demo training run's weights",
    ".venv/bin/omnipose serve --weights runs/demo/model.pt": "the demo training run's weights",
    "omnipose train synth-w8-96x64 data.rotation_prob=0 data.half_body_prob=0 train.epochs=20 "
    "train.lr_steps=[16,19] train.num_threads=1 data.num_workers=1 --output-dir "
    "runs/default-synth-w8": "106 minutes of CPU training on 16,000 images",
    "omnipose export --weights runs/default-synth-w8/model_best.pt --out "
    "model/weights/default.pt": "that run's weights; it would replace the shipped model",
    "omnipose train synth-w8-96x64 data.root=data/synth data.rotation_prob=0 "
    "data.half_body_prob=0 train.lr=1e-4 train.epochs=3 train.lr_steps=[2] "
    "train.num_threads=1 data.num_workers=1 --init model/weights/default.pt --output-dir "
    "runs/default-finetune": "51 minutes of CPU training on 16,000 images",
    "omnipose export --weights runs/default-finetune/model_best.pt --out "
    "model/weights/default.pt": "that run's weights; it would replace the shipped model",
    "omnipose quantize --out model/weights/default.int8": "renders 800 synthetic images and"
    " quantises for minutes; it would replace the shipped int8 model (tests/test_int8.py runs a"
    " bounded version)",
    "omnipose serve --backend openvino --int8-model model/weights/default.int8":
        "a server; tests/test_int8.py loads that artifact through the service's loading",
}

SKIPPED: dict[str, str] = {
    "python3.11 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && .venv/bin/omnipose "
    "predict .venv/lib/python3.11/site-packages/ultralytics/assets/bus.jpg --out results.json "
    "--render rendered/": "the set-up: .ci/run executes this line verbatim",
    ".venv/bin/python -m pytest -q": "the test suite itself (.ci/run executes it)",
    "python3.11 -m venv .venv && .venv/bin/pip install -q --index-url "
    "https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 && .venv/bin/pip "
    "install -q -e '.[dev]'": "the CPU-only set-up: needs the PyTorch CPU index (network)",
    ".venv/bin/torchrun --nproc_per_node=8 -m omnipose.training.cli train coco-w48-384x288":
        "eight GPUs",
    "docker build -f docker/Dockerfile --target cpu -t omnipose-serve:0.1.0-cpu .":
        "a Docker engine (tests/test_docker.py checks the Dockerfile)",
    "docker build -f docker/Dockerfile --target cuda -t omnipose-serve:0.1.0-cuda .":
        "a Docker engine",
    "docker run --rm --read-only -p 8000:8000 -p 50051:50051 -v \"$PWD/weights:/models:ro\" -e "
    "OMNIPOSE_WEIGHTS=/models/pose.pt omnipose-serve:0.1.0-cpu": "a Docker engine",
    "docker compose -f docker/compose.yaml up --build": "a Docker engine",
    "helm install omnipose helm/omnipose -n vision --create-namespace --set "
    "image.repository=registry.example.com/omnipose-serve":
        "a Kubernetes cluster (tests/test_helm.py renders the chart)",
    "helm install omnipose helm/omnipose -n vision --set "
    "image.repository=registry.example.com/omnipose-serve -f helm/omnipose/ci/gpu-values.yaml "
    "--set weights.mode=pvc --set weights.pvc.claimName=omnipose-weights -f "
    "helm/omnipose/ci/autoscaling-values.yaml --set serviceMonitor.enabled=true":
        "a Kubernetes cluster",
    ".venv/bin/python bench/load.py --start-server --config coco-w48-128x96 --no-flip --persons 3 "
    "--levels 1 4 16 --transports rest --duration 10 --precision fp32":
        "a benchmark of minutes with a W48 network",
}


@dataclass
class Documented:
    document: str
    key: str  # the command (bash) or "python: <marker>"
    text: str  # what runs: the command or the snippet
    variables: dict[str, str]  # assignments earlier in the same bash block


def _bash_lines(block: str) -> list[str]:
    """One entry per command: continuation lines joined, comments and extra spaces removed."""
    lines = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        line = re.sub(r"(^|\s+)#\s.*$", "", line).strip()
        if line:
            lines.append(" ".join(line.split()))
    return lines


def _python_key(snippet: str) -> str:
    markers = [key for key in RUN if key.startswith("python: ") and key[8:] in snippet]
    return markers[0] if len(markers) == 1 else f"python: unclassified snippet\n{snippet}"


def documented_commands() -> list[Documented]:
    """The commands of both documents, in document order (later ones use earlier outputs)."""
    found = []
    for document in DOCUMENTS:
        text = (REPO_ROOT / document).read_text()
        in_document: list[tuple[int, Documented]] = []
        for match in FENCE.finditer(text):
            language, block = match[1], match[2]
            if language == "python":
                in_document.append(
                    (match.start(), Documented(document, _python_key(block), block, {})))
                continue
            variables: dict[str, str] = {}
            for line in _bash_lines(block):
                if assignment := ASSIGNMENT.match(line):
                    variables[assignment[1]] = assignment[2].strip("\"'")
                else:
                    in_document.append(
                        (match.start(), Documented(document, line, line, dict(variables))))
        for row in re.finditer(r"^\|.*$", text, re.MULTILINE):
            in_document += [(row.start(), Documented(document, c, c, {}))
                            for c in TABLE_COMMAND.findall(row[0])]
        found += [command for _, command in sorted(in_document, key=lambda item: item[0])]
    return found


def test_every_documented_command_is_classified() -> None:
    keys = [command.key for command in documented_commands()]
    classified = set(RUN) | set(PARSED) | set(SKIPPED)
    assert not set(RUN) & set(PARSED) and not (set(RUN) | set(PARSED)) & set(SKIPPED)
    unclassified = [key for key in keys if key not in classified]
    assert not unclassified, f"documented but neither run, parsed nor skipped: {unclassified}"
    stale = classified - set(keys)
    assert not stale, f"listed here but no longer documented: {stale}"


def _argv(command: Documented) -> list[str]:
    text = command.text
    for name, value in command.variables.items():
        text = text.replace(f"${name}", value)
    argv = shlex.split(text)
    assert Path(argv[0]).name == "omnipose", command.text
    return argv[1:]


@pytest.mark.parametrize("key", sorted(PARSED))
def test_documented_commands_that_need_data_or_hours_parse(key: str) -> None:
    (command,) = [c for c in documented_commands() if c.key == key]
    argv = _argv(command)
    try:
        args = parse_arguments(build_parser(argv[0]), argv)
    except SystemExit as exc:
        pytest.fail(f"{command.document}: {key!r} does not parse (exit {exc.code})")
    if argv[0] in ("train", "eval"):
        from omnipose.training.config import load_config

        load_config(args.config, list(args.overrides))


# --- running ---------------------------------------------------------------------------------
def _scratch_root(tmp: Path) -> Path:
    """A folder that looks like the repository root to the documented commands."""
    root = tmp / "clone"
    site = root / ".venv" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (root / ".venv" / "bin").symlink_to(Path(sys.executable).parent, target_is_directory=True)
    spec = importlib.util.find_spec("ultralytics")
    assert spec is not None and spec.submodule_search_locations
    (site / "ultralytics").symlink_to(spec.submodule_search_locations[0], target_is_directory=True)
    (root / "model").symlink_to(REPO_ROOT / "model", target_is_directory=True)
    return root


@dataclass
class Scratch:
    root: Path
    env: dict[str, str]
    http_port: int
    grpc_port: int
    server: subprocess.Popen | None = None

    def localise(self, text: str) -> str:
        return text.replace(HTTP_PORT, f":{self.http_port}").replace(
            GRPC_PORT, f":{self.grpc_port}")

    def run(self, text: str, variables: dict[str, str], timeout: float = 60) -> str:
        prefix = "".join(f"{name}={shlex.quote(value)}; " for name, value in variables.items())
        proc = subprocess.run(["bash", "-c", prefix + self.localise(text)], cwd=self.root,
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{text}\n{proc.stderr[-3000:]}"
        return proc.stdout

    def run_python(self, snippet: str, timeout: float = 120) -> str:
        proc = subprocess.run([sys.executable, "-c", self.localise(snippet)], cwd=self.root,
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{snippet}\n{proc.stderr[-3000:]}"
        return proc.stdout

    def start_server(self, text: str) -> None:
        log = self.root.parent / "server.log"
        with open(log, "wb") as output:  # a file, not a pipe nobody reads while it runs
            self.server = subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=self.root,
                                           env=self.env, stdout=output, stderr=output)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.server.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"http://127.0.0.1:{self.http_port}/readyz", timeout=1.0)
                if ready.status_code == 200:
                    return
            time.sleep(0.2)
        pytest.fail(f"{text!r} not ready within 90 s")


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Scratch]:
    http_port, grpc_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("OMNIPOSE_")}
    env |= {"YOLO_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
            "OMNIPOSE_HOST": "127.0.0.1", "OMNIPOSE_HTTP_PORT": str(http_port),
            "OMNIPOSE_GRPC_PORT": str(grpc_port), "OMNIPOSE_WARMUP": "false",
            "OMNIPOSE_MODEL_INSTANCES": "1", "OMNIPOSE_LOG_LEVEL": "warning"}
    scratch = Scratch(_scratch_root(tmp_path), env, http_port, grpc_port)
    try:
        yield scratch
    finally:
        if scratch.server is not None and scratch.server.poll() is None:
            scratch.server.kill()
            scratch.server.wait()


def _bounded(command: Documented) -> str:
    text = command.text
    for documented, bounded in RUN[command.key].items():
        assert documented in text, f"{command.key!r} no longer says {documented!r}"
        text = text.replace(documented, bounded)
    return text


def _check_output(key: str, output: str, root: Path) -> None:
    """What each kind of command must have produced."""
    if key.startswith("curl") and " -o " not in key:
        reply = json.loads(output)
        assert "error" not in reply, reply
        results = reply.get("results", [reply])
        assert all("persons" in result for result in results), reply
    elif " -o " in key:
        assert (root / "rendered" / "overlay.jpg").read_bytes()[:2] == b"\xff\xd8"
    elif key == "python: stub.Estimate(":
        assert output.startswith("person "), output
    elif key == "python: stub.StreamEstimate(":
        frames = sorted((root / "data" / "video-demo" / "walk-00" / "frames").glob("*.jpg"))
        printed = output.splitlines()
        assert len(printed) == len(frames) > 0, output
        assert printed[0].startswith("0 detector"), printed[0]
    elif " info " in key:
        assert "coco-w8-96x64" in output and "2,270,627" in output, output
    elif " eval " in key:
        assert "AP" in output, output


def test_documented_commands_run(scratch: Scratch) -> None:
    for command in documented_commands():
        if command.key not in RUN:
            continue
        text = _bounded(command)
        if command.key.endswith(" serve"):
            scratch.start_server(text)
            continue
        if command.key.startswith("python: "):
            output = scratch.run_python(text)
        else:
            output = scratch.run(text, command.variables)
        _check_output(command.key, output, scratch.root)
    assert scratch.server is not None, "the README's serve command did not run"
    scratch.server.send_signal(signal.SIGTERM)
    assert scratch.server.wait(30) == 0
