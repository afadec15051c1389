"""Request bodies read under budget: admission comes before bytes.

The REST handlers check that the engine would admit a request (429/503 now, before any byte)
and reserve its declared ``Content-Length`` against the budget of request bytes in memory
(``max_inflight_body_bytes``, shared with gRPC messages; 429 beyond) before reading a byte of
it. The body is received outside the engine: an upload holds budget bytes, not an engine slot,
so slow uploads cannot starve fast clients; the engine slot is taken once the body is in.
Bodies are read as a stream: a raw image is cut off at ``max_image_bytes``, and a multipart body
is parsed as it arrives (python-multipart's push parser), so each image part is cut off at
``max_image_bytes`` while it is being read and nothing is spooled to disk. A chunked upload (no
``Content-Length``) takes budget as its bytes arrive. A body that stalls (no byte for
``http_body_idle_timeout_s``) or trickles (under ``http_body_min_rate_bytes_s`` on average once
that long has passed) is answered 408 (:class:`BodyPace`). A refused request leaves its body
unread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Receive

from omnipose.service.admission import BudgetLease, SharedBudget
from omnipose.service.errors import EngineError, ErrorCode, InvalidRequest

MAX_FIELD_BYTES = 64 * 1024  # a form field holds options (boxes JSON at most), not data
MAX_FIELDS = 100


class ClientDisconnected(Exception):
    """The client closed the connection while its body was being read."""


def body_too_large(
    limit: int, length: int | None = None, what: str = "the request body"
) -> InvalidRequest:
    size = f"{length} bytes, " if length is not None else ""
    return InvalidRequest(
        f"{what} is {size}over the limit of {limit} bytes", ErrorCode.PAYLOAD_TOO_LARGE
    )


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length header, if it is a plain number."""
    for name, value in headers:
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isascii() and text.isdigit() else None
    return None


@dataclass(frozen=True)
class BodyPace:
    """How slowly a body may arrive: a pause of ``idle_timeout_s`` without a byte, or an average
    under ``min_rate_bytes_s`` once the body has taken ``idle_timeout_s``, is answered 408. Slow
    bodies no longer hold engine slots, but they hold body budget and a connection."""

    idle_timeout_s: float = 10.0
    min_rate_bytes_s: float = 1024.0

    def check(self, received: int, elapsed_s: float) -> None:
        if elapsed_s > self.idle_timeout_s and received < self.min_rate_bytes_s * elapsed_s:
            raise InvalidRequest(
                f"the request body arrived at {received / elapsed_s:.0f} bytes/s, under the"
                f" minimum of {self.min_rate_bytes_s:g} bytes/s", ErrorCode.REQUEST_TIMEOUT)

    async def next_message(self, receive: Receive) -> dict:
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                return await receive()
        except TimeoutError:
            raise InvalidRequest(
                f"no byte of the request body arrived for {self.idle_timeout_s:g} s",
                ErrorCode.REQUEST_TIMEOUT) from None


UNPACED = BodyPace(float("inf"), 0.0)


async def body_chunks(
    receive: Receive, lease: BudgetLease, budget: SharedBudget, limit: int,
    pace: BodyPace = UNPACED,
) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, counted against ``limit`` (413) and the budget (beyond
    what the request reserved from its Content-Length), at ``pace`` or faster (408)."""
    received = 0
    started = time.monotonic()
    while True:
        message = await pace.next_message(receive)
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise body_too_large(limit)
        budget.take(lease, received - lease.held)
        more = message.get("more_body", False)
        if more:
            pace.check(received, time.monotonic() - started)
        if chunk:
            yield chunk
        if not more:
            return


async def read_raw_body(
    receive: Receive,
    lease: BudgetLease,
    budget: SharedBudget,
    limit: int,
    what: str = "the request body (one image)",
    pace: BodyPace = UNPACED,
) -> bytes:
    data = bytearray()
    try:
        async for chunk in body_chunks(receive, lease, budget, limit, pace):
            data += chunk
    except InvalidRequest as exc:
        if exc.code == ErrorCode.PAYLOAD_TOO_LARGE:
            raise body_too_large(limit, what=what) from None
        raise
    return bytes(data)


@dataclass
class _Part:
    name: str = ""
    is_file: bool = False
    data: bytearray = field(default_factory=bytearray)


@dataclass
class MultipartBody:
    files: list[tuple[str, bytes]]  # (field name, bytes) in order
    fields: list[tuple[str, str]]


class _StreamingForm:
    """python-multipart callbacks that keep parts in memory and enforce limits per part."""

    def __init__(
        self, file_field: str, max_files: int, file_limit: int, too_many_files: EngineError
    ) -> None:
        self.file_field = file_field
        self.max_files = max_files
        self.file_limit = file_limit
        self.too_many_files = too_many_files
        self.parts: list[_Part] = []
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._files = 0

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self._disposition = b""
        self.parts.append(_Part())

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._header_field).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        part = self.parts[-1]
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidRequest("a multipart part has no name in its Content-Disposition")
        part.name = options[b"name"].decode("utf-8", "replace")
        part.is_file = b"filename" in options or part.name == self.file_field
        if part.is_file:
            if part.name != self.file_field:
                raise InvalidRequest(
                    f"form field {part.name!r} must be a value, not a file"
                    f" (images go in the {self.file_field!r} field)"
                )
            self._files += 1
            if self._files > self.max_files:
                raise self.too_many_files
        elif len(self.parts) - self._files > MAX_FIELDS:
            raise InvalidRequest(f"more than {MAX_FIELDS} form fields")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.data += data[start:end]
        if part.is_file and len(part.data) > self.file_limit:
            what = (
                self.file_field
                if self.max_files == 1
                else (f"{self.file_field}[{self._files - 1}]")
            )
            raise body_too_large(self.file_limit, what=f"the request body's image part {what!r}")
        if not part.is_file and len(part.data) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"form field {part.name!r} is over {MAX_FIELD_BYTES} bytes")


async def read_multipart(
    receive: Receive,
    content_type: str,
    lease: BudgetLease,
    budget: SharedBudget,
    body_limit: int,
    *,
    file_field: str,
    max_files: int,
    file_limit: int,
    too_many_files: EngineError,
    pace: BodyPace = UNPACED,
) -> MultipartBody:
    """Parse a multipart body as it arrives, each file part cut off at ``file_limit``."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequest(
            "the multipart body cannot be parsed (is the boundary in the content type?)"
        )
    form = _StreamingForm(file_field, max_files, file_limit, too_many_files)
    try:
        parser = MultipartParser(boundary, form.callbacks())
        async for chunk in body_chunks(receive, lease, budget, body_limit, pace):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequest(f"the multipart body cannot be parsed: {exc}") from None
    except ValueError as exc:  # e.g. a malformed boundary
        raise InvalidRequest(f"the multipart body cannot be parsed: {exc}") from None
    files = [(p.name, bytes(p.data)) for p in form.parts if p.is_file]
    fields = [(p.name, p.data.decode("utf-8", "replace")) for p in form.parts if not p.is_file]
    return MultipartBody(files, fields)


# The formats the decoder reads, by the magic bytes their files start with.
_MAGIC: tuple[tuple[str, bytes, int], ...] = (  # (format, magic, offset)
    ("jpeg", b"\xff\xd8\xff", 0),
    ("png", b"\x89PNG\r\n\x1a\n", 0),
    ("gif", b"GIF8", 0),
    ("bmp", b"BM", 0),
    ("webp", b"WEBP", 8),
    ("tiff", b"II*\0", 0),
    ("tiff", b"MM\0*", 0),
)
_DECLARED = {
    "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/pjpeg": "jpeg", "image/png": "png",
    "image/gif": "gif", "image/bmp": "bmp", "image/x-ms-bmp": "bmp", "image/webp": "webp",
    "image/tiff": "tiff",
}


def sniffed_format(data: bytes) -> str | None:
    """The image format ``data`` starts like, or None for anything else (the decoder judges)."""
    for name, magic, offset in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def check_declared_type(content_type: str, data: bytes) -> None:
    """A raw body whose Content-Type names one image format and whose bytes are another (JPEG
    bytes sent as image/png) is refused 415 naming both: the client has mislabelled its data,
    and answering as if nothing were wrong would hide a bug on its side. A generic or unknown
    image type (``image/*``, ``image/x-foo``) is not checked, nor are bytes of no known format
    (the decoder answers those 400)."""
    declared = _DECLARED.get(content_type)
    actual = sniffed_format(data)
    if declared is not None and actual is not None and actual != declared:
        raise InvalidRequest(
            f"the Content-Type is {content_type!r} but the body is a {actual.upper()} image;"
            f" send it as {_mime(actual)!r} (or as image/* to let the service tell)",
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        )


def _mime(image_format: str) -> str:
    return f"image/{image_format}"
