"""The HTTP/1.1 server under the REST app: uvicorn's h11 protocol with the limits a public port
needs, and the transport-level pieces of a graceful shutdown.

uvicorn on its own holds a connection that never finishes its request head forever (slowloris),
has no cap on open connections that answers in our error shape, and answers malformed or
over-long request heads in plain text. :class:`GuardedH11Protocol` adds:

* a **header-read timeout**: a request line and headers must arrive within
  ``http_header_timeout_s`` of the connection opening or of the request's first byte; otherwise
  408 (JSON) and the connection closes. Idle keep-alive connections close after
  ``http_keepalive_timeout_s`` (uvicorn's own timer);
* a **connection limit**: past ``http_max_connections`` open connections, a request on a new one
  is answered 503 (JSON, ``Connection: close``) before its body is read (:class:`TransportGuard`).
  Liveness and readiness probes are exempt, so a connection flood never makes Kubernetes restart
  a healthy pod. The limit is kept below the process's open-files limit
  (:func:`descriptor_safe_limit`), so it applies before descriptors run out;
* a **TLS handshake timeout** equal to the header timeout: a connection that never sends a
  ClientHello is closed like a silent plain one, not after asyncio's default 60 s;
* the **common error shape** for what the HTTP parser refuses: a request head over
  ``http_max_header_bytes`` (e.g. an over-long URL) gets 431, any other malformed head 400.

:class:`TransportGuard` (ASGI) also registers the requests being handled in
:class:`InflightRequests`, so that a shutdown whose grace period ends can answer each of them 503
in JSON instead of uvicorn's plain-text 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

OVER_CONNECTION_LIMIT = "omnipose.over_connection_limit"  # key in the ASGI scope's state
# An early answer (an error before the body was read) drains a body up to this size so the
# connection stays usable; a larger one is left unread and the connection closes. A 408 (the
# body stalled or trickled) is never drained: the same slow client would only be waited on again.
DRAIN_BYTES = 1024 * 1024
DRAIN_TIMEOUT_S = 5.0
BODY_TIMED_OUT = 408
# Probes answered even on connections over the limit (they are cheap and never read a body).
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
# Descriptors kept out of the HTTP connection limit: the gRPC server's connections and listener,
# model and log files, the CPU pool's pipes, and the over-limit connections that are accepted
# only to be answered 503.
RESERVED_DESCRIPTORS = 256
ACCEPT_FAILURE = "socket.accept() out of system resource"


class OpenTransports:
    """The listeners' open connections, those still in their TLS handshake included: uvicorn
    counts a connection only once its protocol is connected, which on a TLS port is after the
    handshake, so silent TLS clients would not count against the connection limit."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []

    def count(self) -> int:
        # asyncio.Server counts its transports from accept() to close (no public accessor).
        return sum(getattr(server, "_active_count", 0) for server in self.servers)


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int
    header_timeout_s: float
    keepalive_timeout_s: float
    max_header_bytes: int
    open_transports: OpenTransports = field(default_factory=OpenTransports, compare=False)


def error_bytes(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response in the service's JSON shape that closes the
    connection, written straight to the socket (the request never reached the app)."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def descriptor_safe_limit(max_connections: int) -> int:
    """The connection limit that holds on this process: the soft open-files limit is raised to
    the hard one, and the limit lowered to what is left after :data:`RESERVED_DESCRIPTORS`, so a
    flood is answered 503 instead of failing ``accept()`` with no descriptor left."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    usable = max(1, soft - RESERVED_DESCRIPTORS)
    if usable < max_connections:
        log.warning(
            "http_max_connections %d lowered to %d: the open-files limit is %d (ulimit -n)",
            max_connections, usable, soft,
        )
    return min(max_connections, usable)


class AcceptFailureLog:
    """An event-loop exception handler that logs failed ``accept()`` calls (no descriptor left)
    at most once per ``interval_s``, with a count of those left out: asyncio reports one for every
    pending connection on every retry, thousands a second under a connection flood."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.suppressed = 0
        self._last = -float("inf")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_FAILURE:
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self.suppressed += 1
            return
        self._last = now
        log.error(
            "cannot accept connections: %s (%d more such failures since the last report)",
            context.get("exception"), self.suppressed,
        )
        self.suppressed = 0


@contextlib.contextmanager
def tls_handshake_timeout(loop: asyncio.AbstractEventLoop, timeout_s: float,
                          open_transports: OpenTransports | None = None) -> Iterator[None]:
    """Servers created on ``loop`` inside the ``with`` give a TLS handshake ``timeout_s``
    (uvicorn has no setting for it; asyncio's default holds a silent connection for 60 s), and
    are recorded in ``open_transports`` so that connections still in their handshake count
    against the connection limit."""
    create_server = loop.create_server

    async def create_server_with_timeout(*args: Any, **kwargs: Any) -> asyncio.Server:
        if kwargs.get("ssl") is not None:  # asyncio refuses the timeout without TLS
            kwargs.setdefault("ssl_handshake_timeout", timeout_s)
        server = await create_server(*args, **kwargs)
        if open_transports is not None:
            open_transports.servers.append(server)
        return server

    loop.create_server = create_server_with_timeout  # type: ignore[method-assign]
    try:
        yield
    finally:
        del loop.create_server  # the instance attribute: the class's method again


def guarded_protocol(limits: HttpLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol class bound to ``limits`` (uvicorn instantiates it per connection)."""

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            open_connections = max(len(self.connections), limits.open_transports.count())
            if open_connections > limits.max_connections:
                # Answered by TransportGuard once the request head is in (body left unread).
                self.app_state = {**self.app_state, OVER_CONNECTION_LIMIT: True}
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:  # bytes of a request head: its clock starts
                self._arm_head_timer()
                # h11 bounds only a head that arrives in pieces; one that arrives whole is
                # measured here, so the limit does not depend on how TCP split the bytes.
                head = self.conn.trailing_data[0] + data
                end = head.find(b"\r\n\r\n")
                if (end if end >= 0 else len(head)) > limits.max_header_bytes:
                    self._close_with(self._head_too_large())
                    return
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is complete
                self._cancel_head_timer()

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    limits.header_timeout_s, self._head_timed_out
                )

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # still answering the previous request on this connection
            self._close_with(
                error_bytes(
                    408,
                    "Request Timeout",
                    "request_timeout",
                    f"the request line and headers did not arrive within"
                    f" {limits.header_timeout_s:g} s",
                )
            )

        def send_400_response(self, msg: str) -> None:
            """The parser refused the request head: say why, in the common error shape."""
            if len(self.conn.trailing_data[0]) > limits.max_header_bytes:
                response = self._head_too_large()
            else:
                response = error_bytes(
                    400, "Bad Request", "bad_request", "the request is not valid HTTP/1.1"
                )
            self._close_with(response)

        @staticmethod
        def _head_too_large() -> bytes:
            return error_bytes(
                431,
                "Request Header Fields Too Large",
                "request_too_large",
                f"the request line and headers are over {limits.max_header_bytes} bytes"
                " (is the URL too long? send options as form fields)",
            )

        def _close_with(self, response: bytes) -> None:
            self._cancel_head_timer()
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(
    app: ASGIApp,
    limits: HttpLimits,
    log_level: str,
    graceful_timeout_s: float,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        ssl_certfile=tls_cert_file,
        ssl_keyfile=tls_key_file,
        lifespan="off",
        log_config=None,  # uvicorn's loggers go through the process's logging set-up (one format)
        log_level=log_level,
        access_log=log_level == "debug",
        http=guarded_protocol(limits),
        timeout_keep_alive=max(1, round(limits.keepalive_timeout_s)),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_graceful_shutdown=max(1, round(graceful_timeout_s)),
    )


class InflightRequests:
    """The REST requests being handled, so a shutdown whose grace ends can answer each one 503
    in the common error shape (uvicorn would cancel them into plain-text 500s)."""

    def __init__(self) -> None:
        self.running: set[asyncio.Task] = set()
        self.abort_message: str | None = None

    def __len__(self) -> int:
        return len(self.running)

    async def abort(self, message: str, timeout: float = 5.0) -> int:
        """Answer every request still being handled 503 ``message``; returns how many."""
        self.abort_message = message
        running = list(self.running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=timeout)
        return len(running)


class TransportGuard:
    """ASGI middleware for what only the transport knows: refuses requests on connections over
    the limit (before reading their body), and runs each request as a task registered in
    ``inflight`` so that :meth:`InflightRequests.abort` can answer it. ``drain_timeout_s``: how
    long an early answer waits for the rest of a small body (the service passes at most its body
    idle timeout: a body paused that long would be answered 408 anyway)."""

    def __init__(self, app: ASGIApp, inflight: InflightRequests,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:  # fmt: skip
        self.app = app
        self.inflight = inflight
        self.drain_timeout_s = drain_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("state", {}).get(OVER_CONNECTION_LIMIT):
            if scope["path"] in PROBE_PATHS:
                await self.app(scope, receive, _closing(send))
                return
            await _send_json(
                send,
                503,
                "unavailable",
                "too many open connections to this server; retry on a new connection later",
                close=True,
            )
            return
        started = False
        body_read = not _has_body(scope)

        async def tracking_receive() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_read and (
                    message["status"] == BODY_TIMED_OUT
                    or not await _drain_small_body(scope, tracking_receive, self.drain_timeout_s)
                ):
                    # Answered (refused) before a large body was read: the rest of it must not
                    # be read, nor taken for the next request, so the connection closes.
                    headers = [*message.get("headers", ()), (b"connection", b"close")]
                    message = {**message, "headers": headers}
            await send(message)

        task = asyncio.ensure_future(self.app(scope, tracking_receive, tracking_send))
        self.inflight.running.add(task)
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            aborted = self.inflight.abort_message is not None and task.cancelled()
            if not aborted or (current is not None and current.cancelling()):
                raise
            if not started:
                await _send_json(send, 503, "unavailable", self.inflight.abort_message, close=True)
        finally:
            self.inflight.running.discard(task)


def _closing(send: Send) -> Send:
    """``send`` with ``Connection: close`` added to the response head."""

    async def send_and_close(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ()), (b"connection", b"close")]
            message = {**message, "headers": headers}
        await send(message)

    return send_and_close


async def _drain_small_body(scope: Scope, receive: Receive, timeout_s: float) -> bool:
    """Read and drop the rest of a small body (at most DRAIN_BYTES declared) within
    ``timeout_s`` so an early answer reaches the client: closing a socket with unread data makes
    the kernel reset the connection, and the client may lose the answer. Large or chunked bodies
    are not read (False)."""
    length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
    if length is None or not length.strip().isdigit() or int(length) > DRAIN_BYTES:
        return False
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return message["type"] == "http.request"
    except TimeoutError:
        return False


def _has_body(scope: Scope) -> bool:
    """Whether the request announces a body (HTTP/1.1: a non-zero length, or chunked)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


async def _send_json(send: Send, status: int, code: str, message: str, close: bool) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
