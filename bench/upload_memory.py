"""Memory under a flood of large uploads: admission before bytes, measured.

Starts a server (``--max-queue-size``, default 4), then ``--clients`` (default 48) clients at once
each upload one ``--body-mib`` (default 20) MiB raw image body over REST, streaming it in 256 KiB
pieces and watching for an early answer. Prints the server's RSS before, its peak during the
flood (sampled every 20 ms from /proc) and the growth, the answers by status, and for every
refused request how many body bytes the client had sent when the refusal arrived: a refusal
that comes after a few hundred KiB of a 20 MiB body was made without reading the body (what
the kernel's socket buffers took is all that moved).

With ``--grpc-clients N``, N gRPC ``Estimate`` calls of the same size (one channel each, so
HTTP/2 flow control does not serialise them) run together with the REST uploads; ``--helm-defaults``
runs the server with the chart's default limits (the settings' defaults: queue 64, 256 MiB of
request bytes, 128 gRPC calls, 20 MiB images) instead of ``--max-queue-size``.

    .venv/bin/python bench/upload_memory.py                  # 48 x 20 MiB against a queue of 4
    .venv/bin/python bench/upload_memory.py --clients 32 --max-queue-size 32 --rounds 3
                                                   # admitted floods; RSS --settle-s after each
    .venv/bin/python bench/upload_memory.py --helm-defaults --body-mib 19 --clients 32 \
        --grpc-clients 128 --settle-s 5            # issue #21: 128 gRPC + 32 REST at once

What it checks: RSS growth at most 300 MB (``--max-growth-mb``), every refusal before the body
is read, no lost answer.
Linux only (reads /proc). The machine may be shared: the RSS figures are the server's own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402

from bench.local_server import local_server, rss_mb, service_environment  # noqa: E402
from bench.samples import BUS_JPG  # noqa: E402
from omnipose.proto import omnipose_pb2 as pb  # noqa: E402

BUS = BUS_JPG if BUS_JPG.is_file() else None
PIECE = 256 * 1024


def upload(port: int, body: bytes, boxes: str) -> tuple[int, int]:
    """One raw-body upload; returns (status, body bytes sent when the answer arrived)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    head = (
        f"POST /v1/pose?boxes={boxes} HTTP/1.1\r\nHost: bench\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sent = 0
    answer = b""
    with sock:
        sock.sendall(head)
        while sent < len(body):
            readable, writable, _ = select.select([sock], [sock], [], 60)
            if readable:
                break
            if writable:
                try:
                    sent += sock.send(body[sent : sent + PIECE])
                except OSError:
                    break
        sock.settimeout(120)
        with contextlib.suppress(OSError):
            while b"\r\n" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
    return status, sent


def estimate_call(target: str, message: bytes) -> tuple[str, int]:
    """One gRPC Estimate on its own channel; (status name, 0)."""
    with grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
        call = channel.unary_unary(
            "/omnipose.v1.PoseEstimation/Estimate",
            request_serializer=None, response_deserializer=None)
        try:
            call(message, timeout=120)
        except grpc.RpcError as error:
            return error.code().name, 0
    return "OK", 0


def estimate_message(image: bytes, boxes: list[list[float]]) -> bytes:
    return pb.EstimateRequest(image=image, boxes=pb.BoxList(boxes=[
        pb.Box(x=x, y=y, width=w, height=h) for x, y, w, h in boxes])).SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--body-mib", type=float, default=20.0)
    parser.add_argument("--max-queue-size", type=int, default=4)
    parser.add_argument("--config", default="coco-w18-128x96")
    parser.add_argument("--rounds", type=int, default=1, help="floods, one after the other")
    parser.add_argument("--settle-s", type=float, default=30.0,
                        help="wait after each flood, then report RSS against the start")
    parser.add_argument("--grpc-clients", type=int, default=0,
                        help="gRPC Estimate calls of the same size, at once with the uploads")
    parser.add_argument("--helm-defaults", action="store_true",
                        help="the server's (and Helm chart's) default limits")
    parser.add_argument("--max-growth-mb", type=float, default=300.0)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra server flag (repeatable), e.g. --server-arg=--max-queue-size=8")
    args = parser.parse_args()

    env = service_environment(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    limits = [] if args.helm_defaults else [
        "--max-queue-size", str(args.max_queue_size),
        "--max-image-bytes", str(int(args.body_mib * 1024 * 1024) + 1)]
    server_args = ["--config", args.config, "--device", "cpu", "--detector", "none",
                   "--log-level", "warning", *limits, *args.server_arg]
    with local_server(server_args, env) as server:
        http_port = server.http_port
        image = BUS.read_bytes() if BUS else b"\xff\xd8"
        body = image + b"\0" * (int(args.body_mib * 1024 * 1024) - len(image))
        box = [[50, 400, 200, 500]]
        boxes = json.dumps(box).replace(" ", "")
        grpc_call = None
        if args.grpc_clients:
            message = estimate_message(body, box)
            estimate_call(server.grpc_target, estimate_message(image, box))  # warm it too

            def grpc_call() -> tuple[str, int]:
                return estimate_call(server.grpc_target, message)
        upload(http_port, image, boxes)  # warm the path once
        time.sleep(1)
        before = rss_mb(server.pid)
        ok = True
        for round_index in range(args.rounds):
            peak, statuses, refused, elapsed = flood(server.pid, http_port, body, boxes,
                                                     args.clients, grpc_call, args.grpc_clients)
            total = len(body)
            queue = "the default limits" if args.helm_defaults else (
                f"max_queue_size {args.max_queue_size}")
            print(
                f"round {round_index + 1}: {args.clients} REST + {args.grpc_clients} gRPC"
                f" clients x {args.body_mib:g} MiB against {queue} ({elapsed:.1f} s)"
            )
            print(
                f"server RSS: before {before:.0f} MB, peak {peak:.0f} MB, growth"
                f" {peak - before:.0f} MB (target <= {args.max_growth_mb:g})"
            )
            print("answers:", dict(sorted(statuses.items(), key=str)))
            ok = ok and peak - before <= args.max_growth_mb
            if refused:
                print(
                    f"refused: {len(refused)}; body sent when refused: median"
                    f" {statistics.median(refused) / 1024:.0f} KiB, max"
                    f" {max(refused) / 1024:.0f} KiB of {total / 1024:.0f} KiB"
                )
            time.sleep(args.settle_s)
            settled = rss_mb(server.pid)
            print(
                f"RSS {args.settle_s:g} s after the flood: {settled:.0f} MB"
                f" ({settled / before:.2f}x the start; target <= 1.20x)"
            )
            ok = ok and all(sent < total for sent in refused) and statuses.get(0, 0) == 0
        return 0 if ok else 1


def flood(pid: int, http_port: int, body: bytes, boxes: str, clients: int,
          grpc_call: Callable[[], tuple[str, int]] | None = None,
          grpc_clients: int = 0) -> tuple[float, Counter, list[int], float]:
    """``clients`` uploads (and ``grpc_clients`` gRPC calls) at once; the server's peak RSS,
    answers by status (gRPC ones by code name), the bytes sent before each REST refusal, and
    the flood's duration."""
    peak = rss_mb(pid)
    results: list[tuple[int, int]] = []
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [
        threading.Thread(target=lambda: results.append(upload(http_port, body, boxes)))
        for _ in range(clients)
    ]
    if grpc_call is not None:
        threads += [threading.Thread(target=lambda: results.append(grpc_call()))
                    for _ in range(grpc_clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    done.set()
    sampler.join()
    statuses = Counter(status for status, _ in results)
    refused = [sent for status, sent in results if status == 429]
    return peak, statuses, refused, elapsed


if __name__ == "__main__":
    sys.exit(main())
