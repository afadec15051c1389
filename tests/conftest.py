"""Shared fixtures: real service processes on loopback, small real photos, a metrics scraper.

The service tests talk to ``python -m omnipose.service.server`` started as a subprocess on free
ports, with real clients (httpx, the generated gRPC stubs), so they exercise exactly what is
deployed: uvicorn, the grpc.aio server, signal handling and the process's thread setup. A process
starts once per session (``server``) and a second one with a tiny queue and a slow batcher
(``slow_server``) for backpressure, deadline and disconnect tests. The light model config and
small images keep them fast on two CPU cores.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.samples import BUS_JPG, ZIDANE_JPG

REPO_ROOT = Path(__file__).resolve().parent.parent
LIGHT_CONFIG = "coco-w18-128x96"
STARTUP_TIMEOUT_S = 90.0

# Limits of the main test server, small enough that tests can exceed them cheaply.
MAX_IMAGE_BYTES = 1_000_000
MAX_IMAGE_PIXELS = 4_000_000
MAX_IMAGES_PER_BATCH = 4
GRPC_MAX_MESSAGE_BYTES = 3_000_000
STREAM_MAX_INFLIGHT = 3
SLOW_QUEUE_DELAY_MS = 3000


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A running ``python -m omnipose.service.server`` with helpers to reach and inspect it."""

    args: list[str]
    log_path: Path
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIPOSE_")}
        env["YOLO_OFFLINE"] = "1"
        command = [sys.executable, "-m", "omnipose.service.server", "--host", "127.0.0.1",
                   "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                   "--config", LIGHT_CONFIG, "--device", "cpu", "--log-level", "warning",
                   *self.args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.http_url}/readyz", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.2)
        pytest.fail(f"server not ready after {timeout} s:\n{self.log()}")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code (kills it if it hangs, and fails)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"server did not stop within {timeout} s of SIGTERM:\n{self.log()}")

    # -- metrics ---------------------------------------------------------------------------
    def scrape(self) -> dict[tuple[str, frozenset], float]:
        """All samples of /metrics as {(sample name, frozenset(labels)): value}."""
        text = httpx.get(f"{self.http_url}/metrics", timeout=10).text
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent: counters start at zero)."""
        return self.scrape().get((name, frozenset(labels.items())), 0.0)


@contextlib.contextmanager
def running_server(tmp_dir: Path, name: str, args: Sequence[str]) -> Iterator[ServerProcess]:
    server = ServerProcess(list(args), tmp_dir / f"{name}.log").start()
    try:
        server.wait_ready()
        yield server
    finally:
        if server.process.poll() is None:
            server.terminate()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main service: HOG detector, short batching delay, small limits."""
    args = ["--detector", "hog", "--max-batch-size", "16", "--max-queue-delay-ms", "20",
            "--max-queue-size", "64", "--max-image-bytes", str(MAX_IMAGE_BYTES),
            "--max-image-pixels", str(MAX_IMAGE_PIXELS),
            "--max-images-per-batch", str(MAX_IMAGES_PER_BATCH),
            "--grpc-max-message-bytes", str(GRPC_MAX_MESSAGE_BYTES),
            "--stream-max-inflight", str(STREAM_MAX_INFLIGHT)]
    with running_server(tmp_path_factory.mktemp("server"), "main", args) as process:
        yield process


@pytest.fixture(scope="session")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One request at a time, and a batcher that waits seconds for a batch to fill: a request
    stays queued long enough to test backpressure, deadlines and disconnects deterministically."""
    args = ["--detector", "none", "--max-queue-size", "1", "--max-batch-size", "8",
            "--max-queue-delay-ms", str(SLOW_QUEUE_DELAY_MS)]
    with running_server(tmp_path_factory.mktemp("slow"), "slow", args) as process:
        yield process


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        yield client


# --- images ----------------------------------------------------------------------------------
def _jpeg(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buffer.tobytes()


@dataclass(frozen=True)
class SampleImages:
    """Real photos (ultralytics' samples) scaled down, as encoded bytes, plus sizes and boxes."""

    bus: bytes  # 405 x 540, four people
    zidane: bytes  # 320 x 180, two people
    bus_size: tuple[int, int]  # width, height
    zidane_size: tuple[int, int]
    bus_boxes: list[list[float]]  # two person-sized boxes, far apart, inside the image


@pytest.fixture(scope="session")
def images() -> SampleImages:
    bus = cv2.imread(str(BUS_JPG))
    zidane = cv2.imread(str(ZIDANE_JPG))
    bus = cv2.resize(bus, (bus.shape[1] // 2, bus.shape[0] // 2), interpolation=cv2.INTER_AREA)
    zidane = cv2.resize(zidane, (zidane.shape[1] // 4, zidane.shape[0] // 4),
                        interpolation=cv2.INTER_AREA)
    return SampleImages(
        bus=_jpeg(bus), zidane=_jpeg(zidane),
        bus_size=(bus.shape[1], bus.shape[0]), zidane_size=(zidane.shape[1], zidane.shape[0]),
        bus_boxes=[[20.0, 110.0, 110.0, 330.0], [250.0, 110.0, 100.0, 320.0]],
    )
