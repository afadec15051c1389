"""The service's error types and request ids, shared by the engine, the batcher and both transports.

An :class:`EngineError` carries a message meant for the client as is and a transport-neutral
:class:`ErrorCode`; REST and gRPC map the code to their own statuses. Unexpected failures reach the
client only as "internal error (request id ...)" (:func:`internal_error`); the details go to the
log under that id.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import time
import uuid
from collections.abc import Awaitable
from contextvars import ContextVar
from enum import StrEnum
from typing import TypeVar

log = logging.getLogger(__name__)

SHUTTING_DOWN = "the service is shutting down"

# The id of the request being served, set by the transports; it travels into the model threads
# with each job so a failure there is logged under the id the client was given.
REQUEST_ID: ContextVar[str | None] = ContextVar("omnipose_request_id", default=None)
# A client's own request id is used only if it is this tame: it is echoed and logged verbatim.
_TAME_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


# --- errors ----------------------------------------------------------------------------------
class ErrorCode(StrEnum):
    """Transport-neutral error kinds; each transport maps them to its own status codes."""

    INVALID_IMAGE = "invalid_image"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_ARGUMENT = "invalid_argument"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    REQUEST_TIMEOUT = "request_timeout"  # the client sent too slowly (a body stalled)
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class EngineError(Exception):
    """A request the engine answers with an error; ``message`` is meant for the client as is."""

    default_code = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code

    def prefixed(self, prefix: str) -> EngineError:
        """The same error with ``prefix`` in front of the message (e.g. the image's index)."""
        clone = copy.copy(self)
        clone.message = f"{prefix}: {self.message}"
        clone.args = (clone.message,)
        return clone


class InvalidRequest(EngineError):
    default_code = ErrorCode.INVALID_ARGUMENT


class EngineOverloaded(EngineError):
    """Admission refused: the engine already holds ``max_queue_size`` requests."""

    default_code = ErrorCode.OVERLOADED

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineError):
    default_code = ErrorCode.DEADLINE_EXCEEDED


T = TypeVar("T")


async def within_deadline(deadline: float, work: Awaitable[T], stage: str) -> T:
    """``work`` awaited until ``deadline`` (time.monotonic), else cancelled and
    DeadlineExceeded naming ``stage``: one rule for the engine's pipeline and the transports'
    body reads, which share a request's one deadline."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await work
    except TimeoutError:
        raise DeadlineExceeded(f"the request's deadline passed {stage}") from None


class EngineUnavailable(EngineError):
    """Not ready yet (loading, warming up) or shutting down."""

    default_code = ErrorCode.UNAVAILABLE


def new_request_id() -> str:
    """A short random id for correlating a client's answer with the server's log."""
    return uuid.uuid4().hex[:16]


def request_id_from(client_value: str | None) -> str:
    """The id the client sent (so its logs and ours line up) if it is tame, else a new one."""
    if client_value is not None and _TAME_REQUEST_ID.fullmatch(client_value):
        return client_value
    return new_request_id()


def internal_error(what: str, request_id: str | None = None) -> EngineError:
    """Log the exception being handled under a request id; the client gets only the id.

    Exception text can carry file paths, library internals or other clients' data, so it is
    for the log, never for the answer.
    """
    request_id = request_id or REQUEST_ID.get() or new_request_id()
    log.error("%s (request id %s)", what, request_id, exc_info=True)
    return EngineError(f"internal error (request id {request_id})", ErrorCode.INTERNAL)


IMAGE_ERROR_CODES = {
    "invalid": ErrorCode.INVALID_IMAGE,
    "unsupported": ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    "too_large": ErrorCode.PAYLOAD_TOO_LARGE,
}
