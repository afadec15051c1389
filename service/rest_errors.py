"""The REST app's error shape and its ASGI middleware: every error, from any layer, is
``{"error": {"code", "message"}}`` with the HTTP status of its :class:`ErrorCode`; every response
carries an ``X-Request-Id`` (the client's own, when it sent a sane one); an unexpected failure
answers only "internal error (request id ...)" and logs the details under it. API keys are
checked before any body is read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnipose.service.auth import KeyChecker, http_path_needs_key, presented_key
from omnipose.service.errors import (
    REQUEST_ID,
    EngineError,
    EngineOverloaded,
    ErrorCode,
    new_request_id,
    request_id_from,
)
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.uploads import ClientDisconnected

log = logging.getLogger(__name__)

HTTP_STATUS = {
    ErrorCode.INVALID_IMAGE: 400,
    ErrorCode.INVALID_ARGUMENT: 422,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.INTERNAL: 500,
}
CLIENT_CLOSED_REQUEST = 499  # nginx's convention: the client went away before the answer
REQUEST_ID_HEADER = "X-Request-Id"


# --- errors ----------------------------------------------------------------------------------
def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


def engine_error_response(error: EngineError) -> JSONResponse:
    headers = None
    if isinstance(error, EngineOverloaded):
        headers = {"Retry-After": str(error.retry_after_s)}
    return error_response(HTTP_STATUS.get(error.code, 500), str(error.code), error.message, headers)


def validation_message(errors: list[dict]) -> str:
    """Pydantic's errors as one line for the client: ``location: message; ...``."""
    parts = []
    for error in errors:
        location = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",))
        parts.append(f"{location}: {error.get('msg')}" if location else str(error.get("msg")))
    return "; ".join(parts)


def request_id_of(scope: Scope) -> str:
    """The id RequestContextMiddleware gave this request (a fresh one outside it)."""
    return scope.get("state", {}).get("request_id") or new_request_id()


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return value.decode("latin-1")
    return None


# --- request context middleware --------------------------------------------------------------
class RequestContextMiddleware:
    """Per HTTP request: an id (``X-Request-Id`` on the response, ``REQUEST_ID`` for the engine
    and the logs), and a count by route template and status with its duration. Pure ASGI, so it
    does not buffer bodies or interfere with disconnect detection."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": CLIENT_CLOSED_REQUEST}
        request_id = request_id_from(_client_request_id(scope))
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())
        token = REQUEST_ID.set(request_id)

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except Exception:
            status["code"] = 500
            raise
        finally:
            REQUEST_ID.reset(token)
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.requests.labels("http", endpoint, str(status["code"])).inc()
            self.metrics.request_latency.labels("http", endpoint).observe(
                time.perf_counter() - started)


# --- authentication --------------------------------------------------------------------------
class ApiKeyMiddleware:
    """401 for requests without an accepted API key (``Authorization: Bearer`` or
    ``X-API-Key``), except health, readiness and what the settings leave open. Pure ASGI: the
    refusal comes before any of the body is read."""

    def __init__(self, app: ASGIApp, checker: KeyChecker, settings: Any) -> None:
        self.app = app
        self.checker = checker
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not http_path_needs_key(
                scope["path"], self.settings.metrics_access, self.settings.docs_access):
            await self.app(scope, receive, send)
            return
        headers = {name: value.decode("latin-1") for name, value in scope.get("headers", ())
                   if name in (b"authorization", b"x-api-key")}
        key = presented_key(headers.get(b"authorization"), headers.get(b"x-api-key"))
        if self.checker.accepts(key):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "unauthenticated", "a valid API key is required: send 'Authorization: Bearer"
            " <key>' or 'X-API-Key: <key>'", {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


# --- exception handlers ----------------------------------------------------------------------
async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
    return engine_error_response(exc)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Runs outside RequestContextMiddleware (Starlette's outermost layer): add the id here.
    request_id = request_id_of(request.scope)
    log.error("unexpected error on %s %s (request id %s)", request.method, request.url.path,
              request_id, exc_info=exc)
    return error_response(500, str(ErrorCode.INTERNAL), f"internal error (request id {request_id})",
                          {REQUEST_ID_HEADER: request_id})


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, str(ErrorCode.INVALID_ARGUMENT),
                          validation_message(list(exc.errors())))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


async def _client_gone(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


EXCEPTION_HANDLERS: dict[type[Exception], Callable[..., Awaitable[Response]]] = {
    EngineError: _engine_error,
    Exception: _unexpected_error,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
    ClientDisconnected: _client_gone,
}
