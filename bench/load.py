"""Load generator for the pose service (REST and gRPC), compared with the raw batched model.

What it measures, per transport and concurrency level (default 1, 2, 4, 8, 16, 32): N clients
each send one request at a time (closed loop) for ``--duration`` seconds; throughput in images/s
and persons/s, latency p50/p95/p99 (of answered requests), the mean pose batch size the server
formed (from /metrics), errors (an error answer or a failed call) and lost requests (no answer
within ``--request-timeout``). It also measures the raw model on the same machine:
``estimator.forward`` on batches of ``max_batch_size`` crops, in-process, no service around it,
so ``service crops/s / raw crops/s`` is the fraction of the model's batched throughput the service
delivers; the service's crops are the boxes it was sent (boxes per image x images answered), not
the persons it returned, which OKS-NMS may have merged.

Typical use (starts its own server with the given settings, 10 s per level)::

    .venv/bin/python bench/load.py --start-server --config coco-w18-128x96 --duration 10

or against a running server::

    .venv/bin/python bench/load.py --http-url http://127.0.0.1:8000 --grpc-target 127.0.0.1:50051

With ``--persons K`` every image carries K client boxes (no detection: what the ratio is about);
``--detect`` sends no boxes so the server's detector runs (slower; the ratio is then not
meaningful). Client, server and raw measurement share the machine: on 2 cores the client's own
CPU use (a few % at these rates) counts against the service.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # same OpenMP behaviour as the server

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from omnipose_grpc import omnipose_pb2, omnipose_pb2_grpc  # noqa: E402


@dataclass
class LevelResult:
    transport: str
    concurrency: int
    requests: int
    errors: int
    lost: int  # no answer within --request-timeout
    seconds: float
    images_per_s: float
    persons_per_s: float
    crops_per_s: float | None  # boxes sent x images answered / s (None when the server detects)
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_pose_batch: float
    ratio_to_raw: float | None = None
    server_cpu_ms_per_person: float | None = None  # server process CPU time / persons
    client_cpu_ms_per_person: float | None = None  # this process's CPU time / persons
    server_cpu_ms_per_crop: float | None = None  # server process CPU time / crops sent
    cpu_ratio_to_raw: float | None = None  # raw CPU per crop / server CPU per crop


# --- inputs ----------------------------------------------------------------------------------
def sample_image(width: int) -> np.ndarray:
    """ultralytics' bus.jpg (four people) scaled to ``width`` pixels wide."""
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    assert spec is not None and spec.origin is not None, "ultralytics is not installed"
    image = cv2.imread(str(Path(spec.origin).parent / "assets" / "bus.jpg"))
    height = round(image.shape[0] * width / image.shape[1])
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def person_boxes(count: int, width: int, height: int) -> list[list[float]]:
    """``count`` person-shaped boxes spread over the image (client-supplied boxes)."""
    box_w, box_h = width / max(count, 1) * 0.8, height * 0.6
    return [[i * width / count + 2, height * 0.2, box_w, box_h] for i in range(count)]


# --- raw model -------------------------------------------------------------------------------
class RawModel:
    """estimator.forward on full batches, in this process, with the service's thread setup and
    flip-test setting: the throughput ceiling the service is compared with."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from service.loading import load_pose_model
        from service.resources import configure_threads
        from service.settings import ServiceSettings

        settings = ServiceSettings(config=args.config, device=args.device,
                                   torch_threads=args.torch_threads, flip_test=not args.no_flip)
        configure_threads(settings)
        self.model = load_pose_model(args.weights, args.config, args.device,
                                     flip_test=not args.no_flip)
        height, width = self.model.config.input_size
        self.batch = torch.randn(args.max_batch_size, 3, height, width)
        for _ in range(2):
            self.model.estimator.forward(self.batch)

    def measure(self, duration: float) -> tuple[float, float]:
        """(crops per second, CPU milliseconds per crop) over ``duration`` seconds."""
        import torch

        crops, started, cpu_started = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < duration or crops == 0:
            heatmaps = self.model.estimator.forward(self.batch)
            if heatmaps.device.type == "cuda":
                torch.cuda.synchronize()
            crops += len(self.batch)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        return crops / elapsed, 1000 * cpu / crops


# --- server ----------------------------------------------------------------------------------
def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def started_server(args: argparse.Namespace):
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "service.server", "--host", "127.0.0.1",
               "--http-port", str(http_port), "--grpc-port", str(grpc_port),
               "--config", args.config, "--device", args.device, "--log-level", "warning",
               "--max-batch-size", str(args.max_batch_size),
               "--max-queue-delay-ms", str(args.max_queue_delay_ms),
               "--max-queue-size", str(max(64, 2 * max(args.levels))),
               "--detector", "hog" if args.detect else "none",
               *(["--no-flip-test"] if args.no_flip else []),
               *(["--torch-threads", str(args.torch_threads)] if args.torch_threads else []),
               *(["--weights", args.weights] if args.weights else []),
               *args.server_arg]
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise SystemExit(f"server exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("server not ready after 120 s")
            time.sleep(0.2)
        yield url, f"127.0.0.1:{grpc_port}", process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process, all threads (Linux /proc)."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pose_batch_totals(http_url: str) -> tuple[float, float]:
    """(forward passes, crops) so far, from the server's batch-size histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    count = total = 0.0
    text = httpx.get(f"{http_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == "pose":
                if sample.name == "omnipose_batch_size_count":
                    count = sample.value
                elif sample.name == "omnipose_batch_size_sum":
                    total = sample.value
    return count, total


# --- load ------------------------------------------------------------------------------------
async def run_level(transport: str, concurrency: int, args: argparse.Namespace, image: bytes,
                    boxes: list[list[float]] | None, http_url: str, grpc_target: str,
                    server_pid: int | None) -> LevelResult:
    latencies: list[float] = []
    persons = errors = lost = sent = 0
    stop_at = time.perf_counter() + args.duration
    # the transports' own timeouts are longer, so a hung call is counted as lost, not as an error
    transport_timeout = args.request_timeout + 30

    if transport == "rest":
        params = {"boxes": json.dumps(boxes)} if boxes is not None else {}
        client = httpx.AsyncClient(base_url=http_url, timeout=transport_timeout,
                                   limits=httpx.Limits(max_connections=concurrency + 4))

        async def call() -> int:
            response = await client.post("/v1/pose", content=image, params=params,
                                         headers={"content-type": "image/jpeg"})
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            return len(response.json()["persons"])

        close = client.aclose
    else:
        import grpc

        channel = grpc.aio.insecure_channel(grpc_target, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        request = omnipose_pb2.EstimateRequest(image=image)
        if boxes is not None:
            request.boxes.CopyFrom(omnipose_pb2.BoxList(boxes=[
                omnipose_pb2.Box(x=x, y=y, width=w, height=h) for x, y, w, h in boxes]))

        async def call() -> int:
            return len((await stub.Estimate(request, timeout=transport_timeout)).persons)

        close = channel.close

    async def client_loop() -> None:
        nonlocal persons, errors, lost, sent
        while time.perf_counter() < stop_at:
            sent += 1
            started = time.perf_counter()
            try:
                # not `persons += await ...`: that reads before awaiting
                found = await asyncio.wait_for(call(), args.request_timeout)
            except TimeoutError:  # no answer in time: lost (the call is cancelled)
                lost += 1
                if lost <= 3:
                    print(f"  lost: no answer within {args.request_timeout} s", file=sys.stderr)
                continue
            except Exception as exc:  # counted, reported, never silently dropped
                errors += 1
                if errors <= 3:
                    print(f"  error: {exc}", file=sys.stderr)
                latencies.append(time.perf_counter() - started)
                continue
            persons += found
            latencies.append(time.perf_counter() - started)

    before = pose_batch_totals(http_url)
    server_cpu, client_cpu = process_cpu_s(server_pid), time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    server_cpu = process_cpu_s(server_pid) - server_cpu
    client_cpu = time.process_time() - client_cpu
    after = pose_batch_totals(http_url)
    await close()

    done = sent - errors - lost  # answered with a result
    p50, p95, p99 = ((np.percentile(latencies, [50, 95, 99]) * 1000).tolist() if latencies
                     else [float("nan")] * 3)
    passes = after[0] - before[0]
    crops = len(boxes) * done if boxes is not None else None
    return LevelResult(
        transport=transport, concurrency=concurrency, requests=sent, errors=errors, lost=lost,
        seconds=round(elapsed, 2), images_per_s=round(done / elapsed, 2),
        persons_per_s=round(persons / elapsed, 2),
        crops_per_s=round(crops / elapsed, 2) if crops is not None else None,
        p50_ms=round(p50, 1), p95_ms=round(p95, 1), p99_ms=round(p99, 1),
        mean_pose_batch=round((after[1] - before[1]) / passes, 2) if passes else 0.0,
        server_cpu_ms_per_person=(round(1000 * server_cpu / persons, 2)
                                  if persons and server_pid else None),
        client_cpu_ms_per_person=round(1000 * client_cpu / persons, 2) if persons else None,
        server_cpu_ms_per_crop=(round(1000 * server_cpu / crops, 2)
                                if crops and server_pid else None),
    )


def print_table(results: list[LevelResult], raws: list[float], raw_cpu: list[float]) -> None:
    header = (f"{'transport':>9} {'conc':>4} {'req':>6} {'err':>4} {'lost':>4} {'img/s':>7} "
              f"{'persons/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'batch':>6} "
              f"{'vs raw':>7} {'cpu ms/person':>13} {'client':>6} {'cpu vs raw':>10}")
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = f"{r.ratio_to_raw:.1%}" if r.ratio_to_raw is not None else "-"
        cpu_ratio = f"{r.cpu_ratio_to_raw:.1%}" if r.cpu_ratio_to_raw is not None else "-"
        print(f"{r.transport:>9} {r.concurrency:>4} {r.requests:>6} {r.errors:>4} {r.lost:>4} "
              f"{r.images_per_s:>7.2f} {r.persons_per_s:>9.2f} {r.p50_ms:>8.1f} "
              f"{r.p95_ms:>8.1f} {r.p99_ms:>8.1f} {r.mean_pose_batch:>6.2f} {ratio:>7} "
              f"{r.server_cpu_ms_per_person or float('nan'):>13.2f} "
              f"{r.client_cpu_ms_per_person or float('nan'):>6.2f} {cpu_ratio:>10}")
    if raws:
        print(f"raw model: {np.mean(raws):.2f} crops/s mean (min {min(raws):.2f}, max"
              f" {max(raws):.2f}) over {len(raws)} runs on batches of the max batch size,"
              f" {np.mean(raw_cpu):.2f} CPU ms per crop; 'vs raw' = crops sent per second"
              " (boxes x images answered) / raw crops per second, with the raw runs just before"
              " and after each level; 'cpu vs raw' = raw CPU per crop / server CPU per crop sent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_argument_group("target")
    target.add_argument("--start-server", action="store_true",
                        help="start `python -m service.server` with the settings below")
    target.add_argument("--http-url", default="http://127.0.0.1:8000")
    target.add_argument("--grpc-target", default="127.0.0.1:50051")
    target.add_argument("--server-arg", action="append", default=[],
                        help="extra server flag (repeatable), e.g. --server-arg=--cpu-workers=1")
    load = parser.add_argument_group("load")
    load.add_argument("--transports", nargs="+", choices=["rest", "grpc"],
                      default=["rest", "grpc"])
    load.add_argument("--levels", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    load.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    load.add_argument("--request-timeout", type=float, default=60.0,
                      help="seconds without an answer after which a request counts as lost")
    load.add_argument("--persons", type=int, default=4, help="client boxes per image")
    load.add_argument("--detect", action="store_true", help="send no boxes: server detects")
    load.add_argument("--image-width", type=int, default=400)
    model = parser.add_argument_group("model (for the started server and the raw measurement)")
    model.add_argument("--config", default="coco-w18-128x96")
    model.add_argument("--weights", default=None)
    model.add_argument("--device", default="cpu")
    model.add_argument("--max-batch-size", type=int, default=16)
    model.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    model.add_argument("--torch-threads", type=int, default=None)
    model.add_argument("--no-flip", action="store_true", help="flip test off (server and raw)")
    model.add_argument("--skip-raw", action="store_true", help="do not measure the raw model")
    model.add_argument("--raw-duration", type=float, default=5.0,
                       help="seconds per raw-model measurement (one before, one after each level)")
    parser.add_argument("--json-out", type=Path, help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    image_bgr = sample_image(args.image_width)
    ok, encoded = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    image = encoded.tobytes()
    boxes = None if args.detect else person_boxes(args.persons, image_bgr.shape[1],
                                                   image_bgr.shape[0])
    with contextlib.ExitStack() as stack:
        http_url, grpc_target, server_pid = args.http_url, args.grpc_target, None
        if args.start_server:
            http_url, grpc_target, server_pid = stack.enter_context(started_server(args))
        raw_model = None if args.skip_raw else RawModel(args)
        raws: list[float] = []
        raw_cpu: list[float] = []

        def measure_raw() -> None:
            if raw_model is not None:
                speed, cpu_ms = raw_model.measure(args.raw_duration)
                raws.append(speed)
                raw_cpu.append(cpu_ms)
                print(f"  raw model: {speed:.2f} crops/s, {cpu_ms:.2f} CPU ms/crop", flush=True)

        measure_raw()
        results = []
        for transport in args.transports:
            for level in args.levels:
                result = asyncio.run(run_level(transport, level, args, image, boxes, http_url,
                                               grpc_target, server_pid))
                measure_raw()  # right after each level: the machine may be shared and drift
                if raws and result.crops_per_s is not None:
                    result.ratio_to_raw = round(result.crops_per_s / np.mean(raws[-2:]), 4)
                    if result.server_cpu_ms_per_crop:
                        result.cpu_ratio_to_raw = round(
                            np.mean(raw_cpu[-2:]) / result.server_cpu_ms_per_crop, 4)
                results.append(result)
                print(f"  {transport} x{level}: {result.persons_per_s:.2f} persons/s,"
                      f" p50 {result.p50_ms:.0f} ms, errors {result.errors}", flush=True)
    print()
    print_table(results, raws, raw_cpu)
    if args.json_out:
        args.json_out.write_text(json.dumps({"raw_crops_per_s": raws, "raw_cpu_ms": raw_cpu,
                                             "levels": [asdict(r) for r in results]}, indent=2))
    return 1 if any(r.errors or r.lost for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
