"""The service against a minimal Ray Serve deployment and a raw loop (``load.py --versus-ray``).

Three variants answer the same image (bus.jpg scaled to ``--image-width``, ``--persons`` client
boxes) with the same network:

* **ours**: the service, started with this run's settings (``--backend`` and ``--precision`` go
  to it as given; by default the server's own defaults);
* **ray**: :mod:`bench.ray_serve` (torch fp32, ``@serve.batch(16, 10 ms)``, one replica), given
  as many torch threads as the service's instances x threads, Ray limited to as many CPUs;
* **raw**: in this process, the network alone (``estimator.forward`` on the backend the
  service runs, same precision setting, no flip) on the crops the service cuts for that image
  and those boxes, on one thread with the service's total torch thread count (set up as a pose
  instance thread is; OpenCV's pool off, as in the server): its p50 over a loop of forwards of one
  image's crops (against the 1-client level), and images/s over a loop of batches of
  ``max_batch_size // persons`` images' crops (against the N-client level).

Per round every variant is measured at 1 client (p50, p95) and at ``--versus-clients`` (images/s,
closed loop: each client sends its next request when the last is answered); the variants run one
after another in a rotated order (round r starts with variant r mod 3), so drift on a shared
machine falls on all of them. The ratios are taken within a round, then summarised over rounds
(median, min-max). While one variant runs the other servers sit idle beside it (Ray's idle
processes take a little CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import cv2
import httpx
import numpy as np

from bench.local_server import free_port
from bench.ray_serve import ray_missing, ray_pose_server

VARIANTS = ("ours", "ray", "raw")
QUICK_SECONDS = 4.0


@dataclass
class Measure:
    """One variant at one level in one round."""

    variant: str
    clients: int
    answered: int
    errors: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p95_ms: float


def _measure(variant: str, clients: int, latencies: list[float], errors: int,
             seconds: float, images: int | None = None) -> Measure:
    p50, p95 = ((np.percentile(latencies, [50, 95]) * 1000).tolist() if latencies
                else [float("nan")] * 2)
    images = len(latencies) if images is None else images
    return Measure(variant, clients, len(latencies), errors, round(seconds, 2),
                   round(images / seconds, 3), round(p50, 1), round(p95, 1))


async def closed_loop(variant: str, url: str, clients: int, seconds: float, image: bytes,
                      boxes: list[list[float]], timeout: float) -> Measure:
    """``clients`` clients each POSTing the image (boxes in the query) for ``seconds``."""
    params = {"boxes": json.dumps(boxes)}
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=timeout,
                                 limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def one_client() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    response = await client.post(url, content=image, params=params,
                                                 headers={"content-type": "image/jpeg"})
                    if response.status_code != 200 or len(response.json()["persons"]) == 0:
                        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                except Exception as exc:  # counted and reported, never dropped
                    errors += 1
                    if errors <= 3:
                        print(f"  {variant}: error: {exc!r}", flush=True)
                    continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return _measure(variant, clients, latencies, errors, elapsed)


class RawLoop:
    """The network alone on the service's backend, in this process, on the service's crops."""

    def __init__(self, args: argparse.Namespace, image: bytes, boxes: list[list[float]],
                 threads: int, backend: str, precision: str) -> None:
        import torch

        from omnipose.model.crops import crop_persons
        from omnipose.model.detection import Detections
        from omnipose.service.loading import load_pose_model

        cv2.setNumThreads(1)  # as the server: no OpenCV pool beside the forward's threads
        # forwards run on one thread set up as the service's pose instance thread is
        self._thread = ThreadPoolExecutor(1, initializer=torch.set_num_threads,
                                          initargs=(threads,))
        self.estimator = load_pose_model(args.weights, args.config, args.device, precision,
                                         flip_test=False, backend=backend).estimator
        decoded = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
        array = np.asarray(boxes, dtype=np.float64)
        self.crops = crop_persons(self.estimator, decoded,
                                  Detections(array, np.ones(len(array)))).inputs
        self.images_per_batch = max(1, args.max_batch_size // len(array))
        self.batch = torch.cat([self.crops] * self.images_per_batch)
        for inputs in (self.crops, self.batch) * 2:  # warm-up: allocator, oneDNN primitives
            self._thread.submit(self.estimator.forward, inputs).result()

    def _loop(self, inputs, seconds: float) -> list[float]:
        return self._thread.submit(self._timed_loop, inputs, seconds).result()

    def _timed_loop(self, inputs, seconds: float) -> list[float]:
        times: list[float] = []
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at or len(times) < 3:
            started = time.perf_counter()
            self.estimator.forward(inputs)
            times.append(time.perf_counter() - started)
        return times

    def latency(self, seconds: float) -> Measure:
        times = self._loop(self.crops, seconds)
        return _measure("raw", 1, times, 0, sum(times))

    def throughput(self, clients: int, seconds: float) -> Measure:
        times = self._loop(self.batch, seconds)
        return _measure("raw", clients, times, 0, sum(times), len(times) * self.images_per_batch)


def _spread(values: list[float]) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{np.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def summarise(rounds: list[dict[str, Measure]], clients: int) -> list[str]:
    """Per variant and level: median (min-max) over rounds; the ratios, round by round."""
    def values(variant: str, level: int, field: str) -> list[float]:
        return [getattr(r[f"{variant}@{level}"], field) for r in rounds]

    def ratios(top: tuple[str, int, str], bottom: tuple[str, int, str]) -> list[float]:
        return [a / b for a, b in zip(values(*top), values(*bottom), strict=True) if b]

    lines = [f"over {len(rounds)} round(s), median (min-max):",
             f"{'variant':>8} {f'img/s @{clients}':>24} {'p50 ms @1':>24} {'p95 ms @1':>24}"]
    for variant in VARIANTS:
        lines.append(f"{variant:>8} {_spread(values(variant, clients, 'images_per_s')):>24}"
                     f" {_spread(values(variant, 1, 'p50_ms')):>24}"
                     f" {_spread(values(variant, 1, 'p95_ms')):>24}")
    lines += [
        f"ours/ray images/s at {clients} clients:"
        f" {_spread(ratios(('ours', clients, 'images_per_s'), ('ray', clients, 'images_per_s')))}"
        " (done when >= 1.6 without int8)",
        f"ours/ray p50 at 1 client: {_spread(ratios(('ours', 1, 'p50_ms'), ('ray', 1, 'p50_ms')))}"
        " (done when <= 0.6)",
        f"ours/raw p50 at 1 client: {_spread(ratios(('ours', 1, 'p50_ms'), ('raw', 1, 'p50_ms')))}"
        " (done when <= 1.15)",
        f"ours/raw images/s at {clients} clients:"
        f" {_spread(ratios(('ours', clients, 'images_per_s'), ('raw', clients, 'images_per_s')))}",
    ]
    return lines


def run_versus(args: argparse.Namespace, image: bytes, boxes: list[list[float]],
               started_server) -> int:
    """The interleaved comparison; exit status 1 if any request failed."""
    missing = ray_missing()
    if missing:
        raise SystemExit(missing)
    repeats = 1 if args.quick else args.repeats
    seconds = QUICK_SECONDS if args.quick else args.duration
    clients = args.versus_clients
    args.levels = [1, clients]  # the started server's queue is sized from these
    args.no_flip, args.detect = True, False  # the comparison is about the same crops, no flip
    with contextlib.ExitStack() as stack:
        http_url, _, _ = stack.enter_context(started_server(args))
        served = httpx.get(f"{http_url}/v1/models", timeout=10).json()
        threads = int(served.get("model_instances") or 1) * int(served.get("torch_threads") or 1)
        print(f"  ours: {served.get('backend', 'torch')}, {served['precision']},"
              f" {served.get('model_instances')} instance(s) x {served.get('torch_threads')}"
              f" thread(s); ray and raw get {threads} torch thread(s)", flush=True)
        urls = {"ours": f"{http_url}/v1/pose"}
        urls["ray"] = stack.enter_context(
            ray_pose_server(args.config, args.weights, threads, threads, free_port()))
        # the same precision setting as the server's: "auto" resolves alike in this process
        raw = RawLoop(args, image, boxes, threads, served.get("backend", "torch"),
                      args.precision)
        timeout = args.request_timeout

        def measure(variant: str, level: int) -> Measure:
            if variant == "raw":
                return raw.latency(seconds) if level == 1 else raw.throughput(level, seconds)
            return asyncio.run(closed_loop(variant, urls[variant], level, seconds, image, boxes,
                                           timeout))

        for variant in ("ours", "ray"):  # warm-up: connections, Ray's first batches
            asyncio.run(closed_loop(variant, urls[variant], clients, 1.0, image, boxes, timeout))
        rounds: list[dict[str, Measure]] = []
        for index in range(repeats):
            order = VARIANTS[index % 3:] + VARIANTS[:index % 3]
            measured: dict[str, Measure] = {}
            for level in (1, clients):
                for variant in order:
                    result = measure(variant, level)
                    measured[f"{variant}@{level}"] = result
                    print(f"  round {index + 1} {variant} x{level}: {result.images_per_s:.2f}"
                          f" img/s, p50 {result.p50_ms:.0f} ms, p95 {result.p95_ms:.0f} ms,"
                          f" answered {result.answered}, errors {result.errors}", flush=True)
            rounds.append(measured)
    print()
    lines = [f"{args.config}, {args.persons} boxes/image, flip off; ours and raw:"
             f" {served.get('backend', 'torch')} {served['precision']}, {threads} thread(s) in all;"
             f" ray: torch fp32, {threads} thread(s); {seconds:g} s per level",
             *summarise(rounds, clients)]
    print("\n".join(lines))
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "rounds": [{key: asdict(m) for key, m in r.items()} for r in rounds],
            "summary": lines}, indent=2))
    return 1 if any(m.errors for r in rounds for m in r.values()) else 0
