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

``--versus-ray`` instead compares the service with a minimal Ray Serve deployment of the torch
fp32 network and with a raw loop of the network on the service's backend, interleaved in one run
(bench/versus.py; needs the ``bench`` extra)::

    .venv/bin/python bench/load.py --versus-ray --config coco-w48-128x96 --persons 3 --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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

from omnipose.service.openmp import configure_openmp  # noqa: E402

configure_openmp()  # the server's OpenMP wait policy, before torch loads

from bench.local_server import local_server  # noqa: E402
from bench.versus import QUICK_SECONDS, run_versus  # noqa: E402
from omnipose.proto import omnipose_pb2, omnipose_pb2_grpc  # noqa: E402


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
    """The model alone, in this process, run the way the server runs it: the same precision and
    flip test, and the same instances x threads layouts (the server's fixed one, or every
    candidate it measures at start-up). The best layout is what the service is compared with."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from omnipose.service.loading import load_pose_model
        from omnipose.service.resources import (
            available_cpus,
            candidate_layouts,
            configure_threads,
            configured_layout,
        )
        from omnipose.service.settings import ServiceSettings

        settings = ServiceSettings(config=args.config, device=args.device,
                                   precision=args.precision, model_instances=args.model_instances,
                                   torch_threads=args.torch_threads, flip_test=not args.no_flip)
        configure_threads(settings)
        self.model = load_pose_model(args.weights, args.config, args.device, args.precision,
                                     flip_test=not args.no_flip)
        self.estimator = self.model.estimator
        cpus = available_cpus()
        fixed = configured_layout(settings, cpus, self.estimator.device.type)
        self.layouts = [fixed] if fixed else candidate_layouts(cpus)
        height, width = self.model.config.input_size
        self.batch = torch.randn(args.max_batch_size, 3, height, width)
        self.crops = torch.randn(args.persons, 3, height, width)
        self.best = self.layouts[0]
        self._pools: dict = {}

    def _forward(self, inputs) -> int:
        import torch

        heatmaps = self.estimator.forward(inputs)
        if heatmaps.device.type == "cuda":
            torch.cuda.synchronize()
        return len(inputs)

    def throughput(self, seconds: float, layouts=None) -> dict:
        """Crops per second on full batches, every instance busy, per layout."""
        from omnipose.service.resources import measure_layouts

        return measure_layouts(lambda: self._forward(self.batch), layouts or self.layouts,
                               seconds_per_layout=seconds)

    def _pool(self, layout):
        from concurrent.futures import ThreadPoolExecutor

        import torch

        if layout not in self._pools:
            self._pools[layout] = ThreadPoolExecutor(
                layout.instances, initializer=torch.set_num_threads, initargs=(layout.threads,))
        return self._pools[layout]

    def latency(self, repeats: int) -> dict:
        """Median seconds to forward one image's crops (``--persons``), spread over the layout's
        instances as the server spreads them, per layout."""
        results = {}
        for layout in self.layouts:
            pool = self._pool(layout)
            shares = [s for s in self.crops.tensor_split(min(layout.instances, len(self.crops)))
                      if len(s)]
            for share in shares * 2:  # warm-up: every thread's OpenMP team and allocator
                pool.submit(self._forward, share).result()
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                for future in [pool.submit(self._forward, share) for share in shares]:
                    future.result()
                times.append(time.perf_counter() - started)
            results[layout] = float(np.median(times))
        return results


# --- server ----------------------------------------------------------------------------------
@contextlib.contextmanager
def started_server(args: argparse.Namespace):
    """The server under test, started with this run's settings: (http url, grpc target, pid)."""
    server_args = ["--config", args.config, "--device", args.device, "--log-level", "warning",
                   "--max-batch-size", str(args.max_batch_size),
                   "--max-queue-delay-ms", str(args.max_queue_delay_ms),
                   "--max-queue-size", str(max(64, 2 * max(args.levels))),
                   "--detector", "hog" if args.detect else "none",
                   *(["--no-flip-test"] if args.no_flip else []),
                   "--precision", args.precision,
                   *(["--backend", args.backend] if args.backend else []),
                   *(["--torch-threads", str(args.torch_threads)] if args.torch_threads else []),
                   *(["--model-instances", str(args.model_instances)]
                     if args.model_instances else []),
                   *(["--weights", args.weights] if args.weights else []),
                   *args.server_arg]
    with local_server(server_args, {**os.environ, "YOLO_OFFLINE": "1"}) as server:
        yield server.http_url, server.grpc_target, server.pid


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
                        help="start `python -m omnipose.service.server` with the settings below")
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
    model.add_argument("--model-instances", type=int, default=None,
                       help="default: the server measures; the raw model tries every layout")
    model.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    model.add_argument("--backend", default=None,
                       help="the server's --backend (default: the server's own default); the"
                       " raw loop of --versus-ray runs the backend the server reports")
    model.add_argument("--latency-repeats", type=int, default=7,
                       help="raw forwards of one image's crops, per layout")
    load.add_argument("--busy-level", type=int, default=16,
                      help="rerun this level with a CPU-bound process beside the server"
                      " (oversubscription); 0: skip")
    model.add_argument("--no-flip", action="store_true", help="flip test off (server and raw)")
    model.add_argument("--skip-raw", action="store_true", help="do not measure the raw model")
    model.add_argument("--raw-duration", type=float, default=5.0,
                       help="seconds per raw-model measurement (one before, one after each level)")
    parser.add_argument("--json-out", type=Path, help="also write the results as JSON")
    versus = parser.add_argument_group(
        "--versus-ray: the service against Ray Serve and a raw loop (bench/versus.py)")
    versus.add_argument("--versus-ray", action="store_true",
                        help="start the service (as --start-server), a minimal Ray Serve"
                        " deployment of the torch fp32 network and a raw loop; compare them at"
                        " 1 client and at --versus-clients, rounds interleaved; flip off")
    versus.add_argument("--versus-clients", type=int, default=16)
    versus.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    versus.add_argument("--quick", action="store_true",
                        help=f"smoke check: one round, {QUICK_SECONDS:g} s per level")
    return parser.parse_args(argv)


def layout_table(rates: dict, unit: str) -> str:
    return ", ".join(f"{layout}: {value:.4g} {unit}" for layout, value in rates.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    image_bgr = sample_image(args.image_width)
    ok, encoded = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    image = encoded.tobytes()
    if args.versus_ray:
        return run_versus(args, image, person_boxes(args.persons, image_bgr.shape[1],
                                                    image_bgr.shape[0]), started_server)
    boxes = None if args.detect else person_boxes(args.persons, image_bgr.shape[1],
                                                   image_bgr.shape[0])
    raw_latency: dict = {}
    with contextlib.ExitStack() as stack:
        http_url, grpc_target, server_pid = args.http_url, args.grpc_target, None
        if args.start_server:
            http_url, grpc_target, server_pid = stack.enter_context(started_server(args))
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            served = httpx.get(f"{http_url}/v1/models", timeout=10).json()
            print(f"  server: {served['precision']}, {served.get('backend', 'torch')},"
                  f" {served.get('model_instances')} instance(s) x"
                  f" {served.get('torch_threads')} thread(s)", flush=True)
        raw_model = None if args.skip_raw else RawModel(args)
        raws: list[float] = []
        raw_cpu: list[float] = []

        def measure_raw(all_layouts: bool = False) -> None:
            """Best raw crops/s: every layout at first, then the best one between levels."""
            if raw_model is None:
                return
            cpu_started = time.process_time()
            rates = raw_model.throughput(args.raw_duration,
                                         None if all_layouts else [raw_model.best])
            if all_layouts:
                raw_model.best = max(rates, key=rates.__getitem__)
                print(f"  raw throughput: {layout_table(rates, 'crops/s')}", flush=True)
            speed = rates[raw_model.best]
            cpu_ms = (float("nan") if all_layouts else  # CPU of this layout's run only
                      1000 * (time.process_time() - cpu_started) / (speed * args.raw_duration))
            raws.append(speed)
            raw_cpu.append(cpu_ms)
            print(f"  raw model ({raw_model.best}): {speed:.2f} crops/s", flush=True)

        if raw_model is not None:
            raw_latency = raw_model.latency(args.latency_repeats)
            print(f"  raw latency of {args.persons} crops: "
                  f"{layout_table({k: v * 1000 for k, v in raw_latency.items()}, 'ms')}",
                  flush=True)
        measure_raw(all_layouts=True)
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
        busy_result = None
        if args.busy_level:
            transport = args.transports[0]
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(1)
                busy_result = asyncio.run(run_level(transport, args.busy_level, args, image,
                                                    boxes, http_url, grpc_target, server_pid))
            finally:
                hog.kill()
                hog.wait()
            print(f"  {transport} x{args.busy_level} beside a CPU-bound process:"
                  f" {busy_result.persons_per_s:.2f} persons/s, p50 {busy_result.p50_ms:.0f} ms,"
                  f" errors {busy_result.errors}, lost {busy_result.lost}", flush=True)
    print()
    print_table(results + ([busy_result] if busy_result else []), raws, raw_cpu)
    summary = summarise(args, results, busy_result, raws, raw_latency)
    print()
    for line in summary:
        print(line)
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "raw_crops_per_s": raws, "raw_cpu_ms": raw_cpu,
            "raw_latency_s": {str(k): v for k, v in raw_latency.items()},
            "levels": [asdict(r) for r in results],
            "busy": asdict(busy_result) if busy_result else None, "summary": summary,
        }, indent=2))
    everything = results + ([busy_result] if busy_result else [])
    return 1 if any(r.errors or r.lost for r in everything) else 0


def summarise(args: argparse.Namespace, results: list[LevelResult],
              busy: LevelResult | None, raws: list[float], raw_latency: dict) -> list[str]:
    """The service-against-raw ratios: latency at 1 client, throughput vs raw, oversubscription."""
    lines = [f"summary ({args.config}, precision {args.precision}, {args.persons} boxes/image,"
             f" flip {'off' if args.no_flip else 'on'}):"]
    if raw_latency:
        best_latency = min(raw_latency.values())
        for r in results:
            if r.concurrency == 1:
                lines.append(f"  {r.transport} 1 client: p50 {r.p50_ms:.1f} ms = "
                             f"{r.p50_ms / (best_latency * 1000):.2f}x the best raw forward of"
                             f" {args.persons} crops ({best_latency * 1000:.1f} ms)")
    for r in results:
        if r.ratio_to_raw is not None:
            lines.append(f"  {r.transport} {r.concurrency} clients: {r.crops_per_s:.2f} crops/s"
                         f" = {r.ratio_to_raw:.2f}x the best raw configuration")
    if busy is not None:
        idle = next((r for r in results if r.transport == busy.transport
                     and r.concurrency == busy.concurrency), None)
        if idle is not None and idle.crops_per_s and busy.crops_per_s is not None:
            lines.append(f"  {busy.transport} {busy.concurrency} clients beside a CPU-bound"
                         f" process: {busy.crops_per_s:.2f} crops/s ="
                         f" {busy.crops_per_s / idle.crops_per_s:.2f}x the figure without it")
    answered = sum(r.requests - r.errors - r.lost for r in results)
    lost = sum(r.lost for r in results) + (busy.lost if busy else 0)
    errors = sum(r.errors for r in results) + (busy.errors if busy else 0)
    lines.append(f"  requests answered {answered}, errors {errors}, lost {lost}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
