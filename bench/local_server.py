"""The service as a local process for the benchmark scripts: free loopback ports, ready before
the benchmark starts, SIGTERM when it ends. One place, so every script measures a server started
the same way."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc), 0 once it is gone."""
    with contextlib.suppress(FileNotFoundError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass(frozen=True)
class LocalServer:
    http_port: int
    grpc_port: int
    process: subprocess.Popen

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def local_server(
    server_args: Sequence[str], env: Mapping[str, str] | None = None
) -> Iterator[LocalServer]:
    """``python -m omnipose.service.server SERVER_ARGS`` on free loopback ports, yielded once
    ``/readyz`` answers 200. Exits the script with a message if the server dies or is not ready
    within
    ``READY_TIMEOUT_S``; SIGTERM (then kill after 60 s) on leaving."""
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "omnipose.service.server", "--host", "127.0.0.1",
               "--http-port", str(http_port), "--grpc-port", str(grpc_port), *server_args]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=dict(env or os.environ))
    server = LocalServer(http_port, grpc_port, process)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise SystemExit(f"server exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.http_url}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"server not ready after {READY_TIMEOUT_S:g} s")
            time.sleep(0.2)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
