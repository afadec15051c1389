"""Slow uploads against fast clients: do trickling bodies starve the queue?

Starts a server (``--max-queue-size``, default 10), then alternates two phases of ``--phase-s``
seconds each, ``--rounds`` times: ``--fast-clients`` clients posting bus.jpg (one person box,
raw body) in a loop, alone; then the same clients while ``--slow-uploads`` (default 10) uploads
trickle their bodies at ``--slow-kib-s`` KiB/s each (``X-Request-Timeout: 120``, the longest a
client may ask for). Prints the fast clients' answers and throughput in each phase and the
ratio of the two.

    .venv/bin/python bench/slow_uploads.py                    # 10 x 50 KiB/s against queue 10

What it checks: with the slow uploads the fast clients keep at least 80% of their throughput
alone, and get no 429. The machine may be shared: compare the phases of one round.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.local_server import local_server, service_environment  # noqa: E402
from bench.samples import BUS_JPG  # noqa: E402

BOXES = json.dumps([[20.0, 110.0, 110.0, 330.0]])


def fast_phase(url: str, image: bytes, clients: int, seconds: float) -> Counter:
    """``clients`` loops of raw-body requests for ``seconds``; answers by status."""
    answers: Counter = Counter()
    stop = time.monotonic() + seconds

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < stop:
                response = client.post("/v1/pose", content=image, params={"boxes": BOXES},
                                       headers={"content-type": "image/jpeg"})
                answers[response.status_code] += 1

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


class SlowUploads:
    """``count`` uploads each sending ``rate`` bytes/s of a body declared far larger."""

    def __init__(self, port: int, count: int, rate: float, declared: int) -> None:
        self.socks = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(
                f"POST /v1/pose?boxes={BOXES.replace(' ', '')} HTTP/1.1\r\nHost: bench\r\n"
                f"Content-Type: image/jpeg\r\nX-Request-Timeout: 120\r\n"
                f"Content-Length: {declared}\r\n\r\n".encode() + b"\xff\xd8\xff")
            self.socks.append(sock)
        self.piece = max(1, int(rate / 10))  # ten pieces a second
        self.stop = threading.Event()
        self.cut_off = 0
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            for sock in list(self.socks):
                try:
                    sock.send(b"\0" * self.piece)
                except OSError:  # answered (e.g. 408) and closed by the server
                    self.socks.remove(sock)
                    self.cut_off += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for sock in self.socks:
            sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-queue-size", type=int, default=10)
    parser.add_argument("--fast-clients", type=int, default=4)
    parser.add_argument("--slow-uploads", type=int, default=10)
    parser.add_argument("--slow-kib-s", type=float, default=50.0)
    parser.add_argument("--phase-s", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", default="coco-w18-128x96")
    args = parser.parse_args()

    env = service_environment(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    server_args = ["--config", args.config, "--device", "cpu", "--detector", "none",
                   "--log-level", "warning", "--max-queue-size", str(args.max_queue_size)]
    image = BUS_JPG.read_bytes()
    declared = int(args.slow_kib_s * 1024 * (args.phase_s + 10))
    ratios = []
    ok = True
    with local_server(server_args, env) as server:
        fast_phase(server.http_url, image, 1, 2.0)  # warm the path
        for round_index in range(args.rounds):
            alone = fast_phase(server.http_url, image, args.fast_clients, args.phase_s)
            slow = SlowUploads(server.http_port, args.slow_uploads, args.slow_kib_s * 1024,
                               declared)
            try:
                time.sleep(1.0)  # the slow uploads are in, and trickling
                beside = fast_phase(server.http_url, image, args.fast_clients, args.phase_s)
                still = len(slow.socks)
            finally:
                slow.close()
            ratio = beside[200] / max(1, alone[200])
            ratios.append(ratio)
            print(f"round {round_index + 1}: alone {dict(alone)} ({alone[200] / args.phase_s:.1f}"
                  f" req/s); beside {args.slow_uploads} uploads at {args.slow_kib_s:g} KiB/s"
                  f" {dict(beside)} ({beside[200] / args.phase_s:.1f} req/s): {ratio:.2f}x;"
                  f" slow uploads still sending at the end: {still}")
            ok = ok and ratio >= 0.8 and beside[429] == 0
    print(f"fast clients beside slow uploads / alone: median {statistics.median(ratios):.2f}x,"
          f" range {min(ratios):.2f}-{max(ratios):.2f} (target >= 0.80)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
