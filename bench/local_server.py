"""The service as a local process, for the benchmark scripts and the tests: free loopback ports,
ready before it is used, SIGTERM when it ends. One launcher, so every script and test talks to a
server started the same way.

:class:`ServerProcess` is the process and what reaches it (URLs, ``/metrics`` samples);
:func:`local_server` runs one for the length of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
LOG_TAIL_CHARS = 4000
LISTEN_ATTEMPTS = 3
CANNOT_LISTEN = "cannot listen:"  # what the server logs when a port is taken (server.py)


class ServerError(RuntimeError):
    """The server exited, did not become ready, or did not stop; the message ends with its log
    when it has one."""


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc), 0 once it is gone."""
    with contextlib.suppress(FileNotFoundError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def service_environment(**extra: str) -> dict[str, str]:
    """This process's environment without ``OMNIPOSE_*`` settings (the command line decides),
    YOLO offline, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIPOSE_")}
    env["YOLO_OFFLINE"] = "1"
    env.update(extra)
    return env


@dataclass
class ServerProcess:
    """A ``python -m omnipose.service.server ARGS`` process on free loopback ports.

    ``log_path`` None leaves the server's output on this process's stdout/stderr. ``tls_ca``:
    the server serves HTTPS with a certificate from this CA (``http_url`` is then https).
    """

    args: list[str]
    log_path: Path | None = None
    env: Mapping[str, str] | None = None
    tls_ca: Path | None = None
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        scheme = "https" if self.tls_ca else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> ServerProcess:
        command = [sys.executable, "-m", "omnipose.service.server", "--host", "127.0.0.1",
                   "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                   *self.args]  # fmt: skip
        env = dict(self.env if self.env is not None else os.environ)
        if self.log_path is None:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
        else:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                                stderr=subprocess.STDOUT)  # fmt: skip
        return self

    def log(self) -> str:
        """The end of the server's output ("" when it goes to this process's own)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def _failure(self, message: str) -> ServerError:
        log = self.log()
        return ServerError(f"{message}:\n{log}" if log else message)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Return once ``/readyz`` answers 200; :class:`ServerError` if the process exits first
        or ``timeout`` seconds pass."""
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=self.tls_ca) if self.tls_ca else True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._failure(f"server exited with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(f"{self.http_url}/readyz", verify=verify, timeout=1.0)
                if response.status_code == 200:
                    return
            time.sleep(0.2)
        raise self._failure(f"server not ready after {timeout:g} s")

    def lost_its_port(self) -> bool:
        """Whether the server exited because one of its ports was taken (its own log line)."""
        return self.process.poll() is not None and CANNOT_LISTEN in self.log()

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait; the exit code. A server still running after ``timeout`` seconds is
        killed and :class:`ServerError` raised."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise self._failure(f"server did not stop within {timeout:g} s of SIGTERM") from None

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
def running(server: ServerProcess, ready_timeout: float = READY_TIMEOUT_S,
            stop_timeout: float = STOP_TIMEOUT_S) -> Iterator[ServerProcess]:
    """Start ``server``, yield it once ready, SIGTERM it on leaving (unless it already exited).

    A free port is only free when it is picked: another process (a parallel test worker, another
    job on the machine) may bind it before the server does. A server that exits because it
    cannot listen is started again on new ports, up to ``LISTEN_ATTEMPTS`` times."""
    for attempt in range(1, LISTEN_ATTEMPTS + 1):
        server.start()
        try:
            server.wait_ready(ready_timeout)
            break
        except ServerError:
            if attempt == LISTEN_ATTEMPTS or not server.lost_its_port():
                if server.process.poll() is None:
                    server.terminate(stop_timeout)
                raise
            server.http_port, server.grpc_port = free_port(), free_port()
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.terminate(stop_timeout)


@contextlib.contextmanager
def local_server(
    server_args: Sequence[str], env: Mapping[str, str] | None = None
) -> Iterator[ServerProcess]:
    """For the benchmark scripts: ``python -m omnipose.service.server SERVER_ARGS`` with its output
    on the console, yielded once ready. Exits the script with a one-line message if the server
    dies or is not ready within ``READY_TIMEOUT_S``; SIGTERM (then kill after
    ``STOP_TIMEOUT_S``) on leaving."""
    try:
        with running(ServerProcess(list(server_args), env=env)) as server:
            yield server
    except ServerError as error:
        raise SystemExit(str(error)) from None
