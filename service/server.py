"""The service process: one engine, the REST (uvicorn) and gRPC servers on one event loop.

Life cycle: both servers listen at once (``/healthz`` answers while the model loads), the engine
loads and warms up, then readiness turns on (``/readyz`` 200, gRPC health SERVING). On SIGTERM or
SIGINT readiness turns off, new requests are refused with 503/UNAVAILABLE (the HTTP listener
stays open to say so), in-flight calls finish within ``shutdown_grace_s`` (those still running
then are answered 503/UNAVAILABLE), both servers close, the engine stops, and the process exits 0.

``python -m omnipose.service.server --help`` lists the flags; the ``omnipose serve`` subcommand has
the same ones (``add_serve_parser``). Every flag is a :class:`ServiceSettings` field, which can also
be set as ``OMNIPOSE_<FIELD>`` in the environment; flags win. The OpenMP wait policy
(:func:`~omnipose.service.openmp.configure_openmp`) is set here before the imports that load torch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import socket
import sys
import types
import typing
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from omnipose.service.openmp import configure_openmp

configure_openmp()  # before the imports below load torch: libgomp reads the setting once

import uvicorn  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from omnipose.service.auth import AuthConfigError  # noqa: E402
from omnipose.service.engine import PoseEngine  # noqa: E402
from omnipose.service.grpc_server import GrpcServer  # noqa: E402
from omnipose.service.http_server import (  # noqa: E402
    AcceptFailureLog,
    HttpLimits,
    InflightRequests,
    descriptor_safe_limit,
    tls_handshake_timeout,
    uvicorn_config,
)
from omnipose.service.memory import IdleMemoryTrim, LargeRequestCollector  # noqa: E402
from omnipose.service.metrics import ServiceMetrics  # noqa: E402
from omnipose.service.resources import configure_threads  # noqa: E402
from omnipose.service.rest import create_app  # noqa: E402
from omnipose.service.settings import ServiceSettings  # noqa: E402

log = logging.getLogger("omnipose.server")


# --- command line ----------------------------------------------------------------------------
SERVE_DESCRIPTION = """\
Run the pose service: REST (port 8000) and gRPC (port 50051) in one process, over one engine
that batches the work of all requests.

Both ports listen at once (/healthz answers while the model loads); /readyz and gRPC health
report ready once the model is loaded and warmed up. SIGTERM or SIGINT drains: new requests are
refused (503 / UNAVAILABLE), requests in progress finish within --shutdown-grace-s, and the
process exits 0.

Every option can also be set in the environment as OMNIPOSE_<OPTION> (--max-batch-size is
OMNIPOSE_MAX_BATCH_SIZE) or in an --env-file; options on the command line win. With no
--weights the embedded default model runs (trained on synthetic figures only).
"""


def _flag_kwargs(name: str, annotation: Any) -> dict[str, Any]:
    """argparse options for a settings field's type (Optional unwrapped, Literal -> choices)
    with a metavar that says what to give."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(args), "type": str}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation is Path:
        return {"type": str, "metavar": "FILE"}
    if annotation in (int, float):
        unit = {"_s": "SECONDS", "_ms": "MS"}.get(name[name.rfind("_"):])
        return {"type": annotation, "metavar": unit or "N"}
    return {"type": str, "metavar": "VALUE"}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _help_text(description: str | None) -> str:
    """A setting's description with the other settings it names written as their flags."""
    text = description or ""
    for other in ServiceSettings.model_fields:
        if "_" in other:  # one-word names (weights, device) are ordinary words in the text
            text = re.sub(rf"\b{other}\b", _flag(other), text)
    return text.replace("%", "%%")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per ServiceSettings field; unset flags leave env/defaults in charge."""
    parser.add_argument("--env-file", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                        help="Read OMNIPOSE_* settings from this file (options still win)")
    for name, field in ServiceSettings.model_fields.items():
        default = field.default if field.default is not None else "none"
        parser.add_argument(
            _flag(name), dest=name, default=argparse.SUPPRESS,
            help=f"{_help_text(field.description)} (env OMNIPOSE_{name.upper()}; "
                 f"default {default})",
            **_flag_kwargs(name, field.annotation),
        )


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    """Defaults < environment (and --env-file) < flags."""
    given = vars(args)
    overrides = {name: given[name] for name in ServiceSettings.model_fields if name in given}
    env_file = given.get("env_file")
    if env_file is not None:
        return ServiceSettings(_env_file=env_file, **overrides)
    return ServiceSettings(**overrides)


def serve_command(args: argparse.Namespace) -> int:
    """Handler of ``omnipose serve``: run until SIGTERM/SIGINT; the exit code to return."""
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"omnipose serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    return run(settings)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve``; its handler is ``args.func(args) -> exit code``."""
    parser = subparsers.add_parser(
        "serve", help="Run the REST + gRPC pose service", usage="omnipose serve [OPTIONS]",
        description=SERVE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_settings_arguments(parser)
    parser.set_defaults(func=serve_command)
    return parser


# --- the process -----------------------------------------------------------------------------
class _UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handlers: this process shuts both servers down together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """Bind the HTTP socket ourselves so a taken port is an error we report (uvicorn would exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose
    # proto says TCP, and accepted sockets inherit proto 0 from socket(family, SOCK_STREAM).
    # With Nagle on, a response written in two pieces on a kept-alive connection waits for the
    # client's delayed ACK: 40 ms added to every request after a connection's first.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve(settings: ServiceSettings) -> int:
    """Run both servers until a stop signal; returns the process exit code."""
    threads = configure_threads(settings)
    metrics = ServiceMetrics()
    engine = PoseEngine(settings, metrics)
    try:
        http_socket = _bind(settings.host, settings.http_port)
        grpc_server = GrpcServer(engine, settings.host, settings.grpc_port, metrics)
    except AuthConfigError as exc:
        log.error("invalid API key settings: %s", exc)
        return 2
    except (OSError, RuntimeError) as exc:
        log.error("cannot listen: %s", exc)
        return 1
    try:
        app = create_app(engine, metrics)
    except AuthConfigError as exc:
        log.error("invalid API key settings: %s", exc)
        return 2
    limits = HttpLimits(
        max_connections=descriptor_safe_limit(settings.http_max_connections),
        header_timeout_s=settings.http_header_timeout_s,
        keepalive_timeout_s=settings.http_keepalive_timeout_s,
        max_header_bytes=settings.http_max_header_bytes,
    )
    # uvicorn's own grace only has to close connections whose answers are already written.
    tls = settings.tls_cert_file is not None
    http_server = _UvicornServer(uvicorn_config(
        app, limits, settings.log_level, 5.0,
        str(settings.tls_cert_file) if tls else None, str(settings.tls_key_file) if tls else None,
    ))
    if tls:
        try:
            http_server.config.load()  # reads the certificate now: a bad file is a clear error
        except (OSError, ValueError) as exc:
            log.error("cannot use the TLS certificate files: %s", exc)
            return 1

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    loop.set_exception_handler(AcceptFailureLog())
    await grpc_server.start()
    with tls_handshake_timeout(loop, settings.http_header_timeout_s, limits.open_transports):
        http_task = asyncio.create_task(http_server.serve(sockets=[http_socket]))
        while not (http_server.started or http_task.done()):  # its listener is created
            await asyncio.sleep(0.01)
    log.info("listening: http %s:%d, grpc %s:%d (torch threads %d); loading the model",
             settings.host, http_socket.getsockname()[1], settings.host, grpc_server.port, threads)

    exit_code = 0
    starting = asyncio.create_task(engine.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping, http_task}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        log.error("the pose engine failed to start: %s", starting.exception())
        exit_code = 1
    elif http_task.done():
        log.error("the HTTP server stopped unexpectedly")
        exit_code = 1
    elif starting.done():
        await grpc_server.set_serving()
        gc.freeze()  # what start-up made lives on: later collections no longer scan it
        engine.admission.body_bytes.on_lease_end = LargeRequestCollector().finished
        log.info("ready")
        trimming = asyncio.create_task(
            IdleMemoryTrim(lambda: engine.inflight == 0 and not len(app.state.inflight)).run())
        await asyncio.wait({stopping, http_task}, return_when=asyncio.FIRST_COMPLETED)
        trimming.cancel()
        if http_task.done() and not stopping.done():
            log.error("the HTTP server stopped unexpectedly")
            exit_code = 1

    log.info("shutting down: draining in-flight requests (up to %.0f s); signal again to force",
             settings.shutdown_grace_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _force_exit)
    starting.cancel()
    stopping.cancel()
    engine.begin_drain()
    await grpc_server.enter_drain()
    # The HTTP listener stays open while in-flight work drains: new requests get a JSON 503
    # (draining) instead of "connection refused". Whatever is still running when the grace
    # ends is answered 503 too, then the listener closes.
    grace = settings.shutdown_grace_s
    grpc_stopped = asyncio.create_task(grpc_server.stop(grace))
    if not await _drained(engine, app.state.inflight, grace):
        aborted = await app.state.inflight.abort(
            f"the service is shutting down and its grace period ({grace:g} s) ended before"
            " this request was answered; retry on another replica")
        log.warning("grace period over: answered %d in-flight HTTP requests 503", aborted)
    http_server.should_exit = True
    await asyncio.gather(http_task, grpc_stopped, return_exceptions=True)
    if not await engine.wait_idle(1.0):
        log.warning("%d requests still running after the grace period", engine.inflight)
    await engine.close()
    log.info("stopped")
    return exit_code


async def _drained(engine: PoseEngine, inflight: InflightRequests, timeout: float) -> bool:
    """Wait until no request is admitted in the engine or being handled over HTTP (uploads not
    yet admitted included); False if ``timeout`` ran out first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while engine.inflight or len(inflight):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _force_exit() -> None:
    """A second SIGTERM/SIGINT during the drain: stop now, unanswered requests are dropped."""
    log.warning("second stop signal: exiting without finishing in-flight requests")
    logging.shutdown()
    os._exit(1)


def run(settings: ServiceSettings) -> int:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(serve(settings))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m omnipose.service.server", description=SERVE_DESCRIPTION,
        usage="python -m omnipose.service.server [OPTIONS]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_settings_arguments(parser)
    return serve_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
