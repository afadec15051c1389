"""Shared fixtures: real service processes on loopback, small real photos, a metrics scraper,
and a check that no test leaves threads running.

The service tests talk to ``python -m omnipose.service.server`` started as a subprocess on free
ports (``bench.local_server``, the launcher the benchmarks use too), with real clients (httpx,
the generated gRPC stubs), so they exercise exactly what is deployed: uvicorn, the grpc.aio
server, signal handling and the process's thread setup. Servers are shared by the whole session,
one per distinct command line (``servers``): the main one (``server``) and one with a tiny queue
and a slow batcher (``slow_server``) for backpressure, deadline and disconnect tests. A server
that one module alone needs is started by that module (``running_server``) and stopped after it,
so only a few servers hold memory at once. The light model config and small images keep them
fast on two CPU cores.
"""

from __future__ import annotations

from omnipose.service.openmp import configure_openmp

configure_openmp()  # the server's OpenMP wait policy in this process too, before torch loads

import contextlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import omnipose.model.openvino_runtime  # noqa: E402,F401  (OpenVINO telemetry off, see below)
from bench.local_server import REPO_ROOT, ServerProcess, running, service_environment  # noqa: E402
from bench.samples import BUS_JPG, ZIDANE_JPG  # noqa: E402
from omnipose.model.topdown import TopDownPoseEstimator  # noqa: E402
from omnipose.service import startup  # noqa: E402
from omnipose.service.resources import InstanceLayout, LoneBatchRule  # noqa: E402
from omnipose.service.settings import ServiceSettings  # noqa: E402

# Importing omnipose.model.openvino_runtime makes OpenVINO's telemetry package unimportable for
# this process, whichever test imports openvino first (pytest.importorskip included).
__all__ = ["REPO_ROOT", "ServerProcess", "running_server", "server_process", "wait_until"]

LIGHT_CONFIG = "coco-w18-128x96"
STARTUP_TIMEOUT_S = 90.0
# backend=auto at a warm-up start builds and measures every candidate first (two ONNX exports and
# an OpenVINO conversion among them): over a minute when other jobs share the two cores.
AUTO_STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
TEST_SERVER_ARGS = ("--config", LIGHT_CONFIG, "--device", "cpu", "--log-level", "warning",
                    "--backend", "torch")  # fmt: skip
# Test servers name their backend: backend=auto (the default) measures every backend at a
# warm-up start (the ONNX export alone takes seconds on two cores); the slow server runs auto.
# One single-threaded instance per CPU, as a server without warm-up picks: set, not measured, on
# every test server but the main one. Measuring costs each start seconds of both cores (layouts
# and lone batches timed on the model); the main server, shared by most service tests, still
# measures, so the measured start-up is exercised end to end once per session.
FIXED_LAYOUT_ARGS = ("--torch-threads", "1")

# Limits of the main test server, small enough that tests can exceed them cheaply.
MAX_IMAGE_BYTES = 1_000_000
MAX_IMAGE_PIXELS = 4_000_000
MAX_IMAGES_PER_BATCH = 4
GRPC_MAX_MESSAGE_BYTES = 3_000_000
STREAM_MAX_INFLIGHT = 3
SLOW_QUEUE_DELAY_MS = 3000


def server_process(log_dir: Path, name: str, args: Sequence[str],
                tls_ca: Path | None = None, measure_layout: bool = False) -> ServerProcess:
    """A (not yet started) server with the tests' defaults: the light config on the CPU, quiet
    logging, no ``OMNIPOSE_*`` settings from this environment, the instance layout set rather
    than measured unless ``measure_layout``; ``args`` come after them and win.
    """
    defaults = TEST_SERVER_ARGS if measure_layout else (*TEST_SERVER_ARGS, *FIXED_LAYOUT_ARGS)
    return ServerProcess([*defaults, *args], log_dir / f"{name}.log",
                         env=service_environment(), tls_ca=tls_ca)  # fmt: skip


@contextlib.contextmanager
def running_server(log_dir: Path, name: str, args: Sequence[str],
                   tls_ca: Path | None = None) -> Iterator[ServerProcess]:
    """A server of this test alone (one it stops or kills), SIGTERM on leaving."""
    with running(server_process(log_dir, name, args, tls_ca), STARTUP_TIMEOUT_S,
                 STOP_TIMEOUT_S) as server:  # fmt: skip
        yield server


class ServerPool:
    """Servers started on first use and shared until the session ends, one per command line:
    a test module asking for settings another already started gets that process."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._servers: dict[tuple[str, ...], ServerProcess] = {}
        self._stack = contextlib.ExitStack()

    def get(self, name: str, args: Sequence[str], tls_ca: Path | None = None,
            measure_layout: bool = False,
            startup_timeout: float = STARTUP_TIMEOUT_S) -> ServerProcess:  # fmt: skip
        key = (*args, str(tls_ca), str(measure_layout))
        if key not in self._servers:
            server = server_process(self._log_dir, f"{name}-{len(self._servers)}", args, tls_ca,
                                    measure_layout)  # fmt: skip
            self._servers[key] = self._stack.enter_context(
                running(server, startup_timeout, STOP_TIMEOUT_S)
            )
        return self._servers[key]

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tests' own cache folder (XDG_CACHE_HOME, inherited by the servers they start): a
    backend choice cached by an earlier run or by the developer's own server never decides
    what a test runs. One folder for all workers of this run (their base folders' parent), so a
    second worker's backend=auto server finds the first one's measured choice and compiled
    model, as a restarted deployment does; the cache writes are atomic renames."""
    with pytest.MonkeyPatch.context() as patch:
        if os.environ.get("PYTEST_XDIST_WORKER"):
            folder = tmp_path_factory.getbasetemp().parent / "xdg-cache"
            folder.mkdir(exist_ok=True)
        else:
            folder = tmp_path_factory.mktemp("xdg-cache")
        patch.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session")
def server(servers: ServerPool) -> ServerProcess:
    """The main service: HOG detector, short batching delay, small limits; its instance layout
    measured at start-up, as a deployed server's is."""
    return servers.get("main", [
        "--detector", "hog", "--max-batch-size", "16", "--max-queue-delay-ms", "20",
        "--max-queue-size", "64", "--max-image-bytes", str(MAX_IMAGE_BYTES),
        "--max-image-pixels", str(MAX_IMAGE_PIXELS),
        "--max-images-per-batch", str(MAX_IMAGES_PER_BATCH),
        "--grpc-max-message-bytes", str(GRPC_MAX_MESSAGE_BYTES),
        "--stream-max-inflight", str(STREAM_MAX_INFLIGHT),
    ], measure_layout=True)  # fmt: skip


@pytest.fixture(scope="session")
def slow_server(servers: ServerPool) -> ServerProcess:
    """One request at a time, and a batcher that waits seconds for a batch to fill: a request
    stays queued long enough to test backpressure, deadlines and disconnects deterministically.
    It starts as the default deployment does, with backend=auto measured at warm-up (its tests
    do not depend on the backend), so /v1/models shows a real measured table."""
    return servers.get("slow", [
        "--detector", "none", "--max-queue-size", "1", "--max-batch-size", "8",
        "--max-queue-delay-ms", str(SLOW_QUEUE_DELAY_MS), "--lone-request-waits-for-batch",
        "--backend", "auto",
    ], startup_timeout=AUTO_STARTUP_TIMEOUT_S)  # fmt: skip


def wait_until(condition: Callable[[], bool], timeout: float = 10.0,
               what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds. Tests wait
    for the state they need, never for a fixed time, so a loaded machine only slows them."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached within {timeout:g} s")
        time.sleep(0.02)


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


# --- threads ---------------------------------------------------------------------------------
ENGINE_THREAD_PREFIX = "omnipose-"  # the batcher's instance threads and the engine's CPU pool
THREAD_EXIT_GRACE_S = 5.0


def lingering(thread: threading.Thread) -> bool:
    """A thread that would outlive its test: non-daemon (it keeps the interpreter alive) or one
    of the engine's (an engine that was never closed)."""
    return not thread.daemon or thread.name.startswith(ENGINE_THREAD_PREFIX)


@pytest.fixture(autouse=True)
def no_threads_left_running() -> Iterator[None]:
    """Fail a test that leaves threads running: each test cleans up after itself, so the next
    one's timing and thread counts are its own. Threads get a grace period to finish."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_EXIT_GRACE_S
    for thread in [t for t in threading.enumerate() if t not in before and lingering(t)]:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = [t for t in threading.enumerate() if t not in before and lingering(t) and t.is_alive()]
    if left:
        pytest.fail(f"threads left running: {', '.join(sorted(t.name for t in left))}")


def randomised(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values in every tensor, so heatmaps are far from constant."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(noise + 0.5 if "running_var" in name else (noise - 0.5) * 0.2)
    return network.eval()


def choose_layout_as_if_2x1_fastest(
    monkeypatch: pytest.MonkeyPatch, estimator: TopDownPoseEstimator, **settings: object
) -> tuple[InstanceLayout, LoneBatchRule | None]:
    """:func:`omnipose.service.startup.choose_layout` on 2 CPUs where the 2 x 1 layout measures
    fastest (that measurement replaced; the lone-batch measurement after it is real)."""
    monkeypatch.setattr(startup, "available_cpus", lambda: 2)
    monkeypatch.setattr(startup, "measure_layouts",
                        lambda forward, layouts: {layout: layout.instances for layout in layouts})
    return startup.choose_layout(ServiceSettings(device="cpu", warmup=True, **settings),
                                 estimator)


# --- parallel workers ------------------------------------------------------------------------
# The suite runs in pytest-xdist workers (pyproject: -n auto), one per CPU this process may use:
# most tests are CPU-bound in a single thread or wait on a server, so one process leaves the
# second core of a 2-core machine idle half the time. Each worker starts its own shared servers,
# so more workers also mean more start-ups and memory; MAX_TEST_WORKERS bounds that.
MAX_TEST_WORKERS = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(len(os.sched_getaffinity(0)), MAX_TEST_WORKERS))


# --- process exit ----------------------------------------------------------------------------
_SESSION_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SESSION_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process with pytest's status once pytest is done, skipping the native
    libraries' exit-time destructors (OpenVINO, oneTBB, ONNX Runtime, torch, gRPC all live in
    this one process). Those ran after every test had passed and crashed the process once in CI
    (SIGSEGV after Python's own shutdown, so no stack): a crash in teardown the product never
    runs (each server is its own process, and the tests check their exit codes) must not
    decide the suite's result. In an xdist worker this runs after the worker has sent its results
    (its ``workerfinished`` event is written before pytest_unconfigure)."""
    if _SESSION_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_SESSION_STATUS[-1])
