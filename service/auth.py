"""Optional API-key authentication for both transports.

Keys are never stored in clear in settings: ``api_key_sha256`` holds SHA-256 hex digests
(comma-separated), and ``api_keys_file`` names a mounted file (a Kubernetes Secret) with one
key per line, either a key in clear or ``sha256:<hex digest>``. A presented key is hashed and
compared with every known digest in constant time (``hmac.compare_digest``), so neither the
comparison nor an early exit tells an attacker how much of a key matched.

REST takes the key from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; gRPC from the
``authorization`` (``Bearer <key>``) or ``x-api-key`` metadata. Health and readiness are always
open (probes carry no keys); ``/metrics``, the OpenAPI docs and gRPC reflection are each
``open``, ``auth`` (key required) or ``off`` (not served).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc

HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
OPEN_HTTP_PATHS = frozenset({"/healthz", "/readyz"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
DOCS_ASSETS_PREFIX = "/docs/assets"  # the docs pages' JavaScript, CSS and icon (service.docs_ui)
OPEN_GRPC_SERVICES = ("grpc.health.v1.Health",)
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


class AuthConfigError(ValueError):
    """The key settings cannot be used (unreadable file, malformed digest)."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_key_digests(hashes: str | None, keys_file: Path | None) -> list[str]:
    """Every accepted key as a SHA-256 hex digest, from the settings and the key file."""
    digests = []
    for item in (hashes or "").split(","):
        item = item.strip().lower().removeprefix("sha256:")
        if not item:
            continue
        if not HEX_DIGEST.fullmatch(item):
            raise AuthConfigError("api_key_sha256 must hold SHA-256 hex digests (64 hex digits)")
        digests.append(item)
    if keys_file is not None:
        try:
            lines = Path(keys_file).read_text().splitlines()
        except OSError as exc:
            raise AuthConfigError(
                f"cannot read api_keys_file {keys_file}: {exc.strerror}"
            ) from None
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("sha256:"):
                value = line.removeprefix("sha256:").strip().lower()
                if not HEX_DIGEST.fullmatch(value):
                    raise AuthConfigError(f"{keys_file}: a sha256: line needs 64 hex digits")
                digests.append(value)
            else:
                digests.append(digest(line))
    return digests


class KeyChecker:
    """Constant-time check of a presented key against the known digests."""

    def __init__(self, digests: Iterable[str]) -> None:
        self._digests = [bytes.fromhex(d) for d in digests]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, key: str | None) -> bool:
        if not key:
            return False
        presented = hashlib.sha256(key.encode()).digest()
        matched = False
        for known in self._digests:  # no early exit: every digest is compared
            matched |= hmac.compare_digest(presented, known)
        return matched


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key from ``Authorization: Bearer`` or ``X-API-Key``."""
    if api_key:
        return api_key.strip()
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            return value.strip()
    return None


def http_path_needs_key(path: str, metrics_access: str, docs_access: str) -> bool:
    if path in OPEN_HTTP_PATHS:
        return False
    if path == "/metrics":
        return metrics_access == "auth"
    if path in DOCS_PATHS or path.startswith(f"{DOCS_ASSETS_PREFIX}/"):
        return docs_access == "auth"
    return True


class GrpcKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for calls without an accepted key; health (and reflection when open)
    pass without one."""

    def __init__(self, checker: KeyChecker, reflection_access: str) -> None:
        self.checker = checker
        self.open_services = OPEN_GRPC_SERVICES + (
            REFLECTION_SERVICES if reflection_access == "open" else ()
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").split("/")[0]
        if handler is None or service in self.open_services:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        key = presented_key(metadata.get("authorization"), metadata.get("x-api-key"))
        if self.checker.accepts(key):
            return handler
        return _refusing(
            handler,
            "a valid API key is required (metadata 'authorization: Bearer <key>' or 'x-api-key')",
        )


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same call type that answers UNAUTHENTICATED without reading requests."""

    async def unary_response(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream_response(request: object, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream_response, **kwargs)
