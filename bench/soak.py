"""A bounded soak: mixed valid and invalid traffic over REST and gRPC, streams opened and
cancelled, for ``--duration`` seconds (default 600), against a server it starts.

Reports the server's RSS over time (every ``--report-every`` s), the answers by transport and
code, the 5xx answers and the lost requests (a call that got no answer at all: a connection
error or a client timeout). Exits 1 if anything was lost, any 5xx came back, or RSS grew more
than 10% between the end of warm-up (``--warmup``, default 60 s) and the end.

    .venv/bin/python bench/soak.py                    # 10 minutes, 6 workers
    .venv/bin/python bench/soak.py --duration 60      # a quick look

Linux only (reads /proc). The machine may be shared: RSS is the server's own.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import grpc
import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.local_server import local_server, rss_mb, service_environment  # noqa: E402
from omnipose.proto import omnipose_pb2 as pb  # noqa: E402
from omnipose.proto import omnipose_pb2_grpc  # noqa: E402

KEEPALIVE_EXPIRY_S = 2.0
BOXES = [[20.0, 110.0, 110.0, 330.0], [250.0, 110.0, 100.0, 320.0]]


def sample_image() -> bytes:
    path = next(REPO_ROOT.glob(".venv/lib/python3.11/site-packages/ultralytics/assets/bus.jpg"))
    image = cv2.imread(str(path))
    image = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2))
    return cv2.imencode(".jpg", image)[1].tobytes()


class Tally:
    """Answers by (transport, kind, code); lost calls; thread-safe."""

    def __init__(self) -> None:
        self.answers: Counter[tuple[str, str, str]] = Counter()
        self.lost: Counter[str] = Counter()
        self.lock = threading.Lock()

    def answer(self, transport: str, kind: str, code: str) -> None:
        with self.lock:
            self.answers[(transport, kind, code)] += 1

    def lose(self, what: str) -> None:
        with self.lock:
            self.lost[what] += 1


def server_error(transport: str, kind: str, code: str) -> bool:
    """A 5xx (or gRPC's equivalents) that is not the intended answer of a deliberately short
    deadline (504 / DEADLINE_EXCEEDED)."""
    if transport == "rest":
        return code.startswith("5") and not (kind == "short_deadline" and code == "504")
    return code in ("INTERNAL", "UNKNOWN", "DATA_LOSS")


def rest_operations(client: httpx.Client, image: bytes) -> dict:
    files = {"image": ("bus.jpg", image, "image/jpeg")}
    boxes = json.dumps(BOXES)
    return {
        "valid": lambda: client.post("/v1/pose", files=files, params={"boxes": boxes}),
        "detect": lambda: client.post(
            "/v1/pose", content=image, headers={"content-type": "image/jpeg"}
        ),
        "batch": lambda: client.post(
            "/v1/pose/batch",
            files=[
                ("images", ("a.jpg", image, "image/jpeg")),
                ("images", ("b.jpg", image, "image/jpeg")),
            ],
        ),
        "garbage": lambda: client.post(
            "/v1/pose", files={"image": ("x.jpg", b"junk" * 100, "image/jpeg")}
        ),
        "bad_boxes": lambda: client.post("/v1/pose", files=files, data={"boxes": "[[1,2]]"}),
        "nested": lambda: client.post("/v1/pose", files=files, data={"boxes": "[" * 5000}),
        "unknown_param": lambda: client.post("/v1/pose", files=files, params={"flipp": "1"}),
        "short_deadline": lambda: client.post(
            "/v1/pose", files=files, params={"boxes": boxes}, headers={"X-Request-Timeout": "0.01"}
        ),
        "models": lambda: client.get("/v1/models"),
    }


def grpc_operations(stub: omnipose_pb2_grpc.PoseEstimationStub, image: bytes) -> dict:
    request = pb.EstimateRequest(image=image)
    request.boxes.boxes.extend(pb.Box(x=x, y=y, width=w, height=h) for x, y, w, h in BOXES)

    def stream_cancelled() -> str:
        frames = (pb.StreamFrame(frame_id=i, request=request) for i in range(4))
        call = stub.StreamEstimate(frames, timeout=60)
        next(call)  # one result, then walk away
        call.cancel()
        return "OK_CANCELLED"

    return {
        "valid": lambda: stub.Estimate(request, timeout=60),
        "garbage": lambda: stub.Estimate(pb.EstimateRequest(image=b"junk"), timeout=60),
        "short_deadline": lambda: stub.Estimate(request, timeout=0.01),
        "batch": lambda: stub.EstimateBatch(
            pb.EstimateBatchRequest(images=[request, request]), timeout=60
        ),
        "stream_cancelled": stream_cancelled,
    }


def worker(
    index: int, http_url: str, grpc_target: str, image: bytes, stop: threading.Event, tally: Tally
) -> None:
    rng = random.Random(index)
    # Idle connections are dropped before the server's keep-alive timeout (5 s) closes them:
    # otherwise a request sent just as the server closes the connection is lost (the race
    # every HTTP/1.1 client must avoid; proxies likewise keep their upstream idle timeout lower).
    limits = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
    with (
        httpx.Client(base_url=http_url, timeout=60, limits=limits) as client,
        grpc.insecure_channel(grpc_target) as channel,
    ):
        rest = rest_operations(client, image)
        rpc = grpc_operations(omnipose_pb2_grpc.PoseEstimationStub(channel), image)
        while not stop.is_set():
            if rng.random() < 0.5:
                kind = rng.choice(list(rest))
                try:
                    tally.answer("rest", kind, str(rest[kind]().status_code))
                except httpx.HTTPError as exc:
                    tally.lose(f"rest {kind}: {type(exc).__name__}")
            else:
                kind = rng.choice(list(rpc))
                try:
                    result = rpc[kind]()
                    tally.answer("grpc", kind, result if isinstance(result, str) else "OK")
                except grpc.RpcError as exc:
                    code = exc.code()
                    if code == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or ""):
                        tally.lose(f"grpc {kind}: {exc.details()}")
                    else:
                        tally.answer("grpc", kind, code.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--report-every", type=float, default=60.0)
    parser.add_argument("--config", default="coco-w18-128x96")
    args = parser.parse_args()

    env = service_environment()
    server_args = ["--config", args.config, "--device", "cpu", "--detector", "hog",
                   "--max-queue-size", "16", "--log-level", "error"]
    with local_server(server_args, env) as server:
        http_url, grpc_target = server.http_url, server.grpc_target
        image, tally, stop = sample_image(), Tally(), threading.Event()
        threads = [
            threading.Thread(target=worker, args=(i, http_url, grpc_target, image, stop, tally))
            for i in range(args.workers)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        print(f"soak: {args.workers} workers, {args.duration:g} s, server pid {server.pid}")
        print("   t s   RSS MB   answers   5xx   lost")
        warm_rss, next_report, last_rss = None, 0.0, 0.0
        while (elapsed := time.monotonic() - started) < args.duration:
            last_rss = rss_mb(server.pid)
            if warm_rss is None and elapsed >= args.warmup:
                warm_rss = last_rss
            if elapsed >= next_report:
                with tally.lock:
                    answers = sum(tally.answers.values())
                    errors = sum(n for key, n in tally.answers.items() if server_error(*key))
                    lost = sum(tally.lost.values())
                print(
                    f"{elapsed:6.0f} {last_rss:8.0f} {answers:9d} {errors:5d} {lost:6d}", flush=True
                )
                next_report += args.report_every
            time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(120)
        final_rss = rss_mb(server.pid)
        warm_rss = warm_rss or final_rss
        growth = (final_rss - warm_rss) / warm_rss * 100
        server_5xx = sum(n for key, n in tally.answers.items() if server_error(*key))
        lost = sum(tally.lost.values())
        print("\nanswers by transport, kind, code:")
        for (transport, kind, code), count in sorted(tally.answers.items()):
            print(f"  {transport:4} {kind:16} {code:22} {count}")
        for what, count in tally.lost.items():
            print(f"  LOST {what}: {count}")
        print(
            f"\ntotal {sum(tally.answers.values())} answers, {server_5xx} 5xx, {lost} lost;"
            f" RSS after warm-up {warm_rss:.0f} MB, at the end {final_rss:.0f} MB"
            f" ({growth:+.1f}%)"
        )
        return 0 if lost == 0 and server_5xx == 0 and growth < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
