"""Request bodies read under budget: admission comes before bytes.

The REST handlers admit a request (queue slot, 429/503) and reserve its declared
``Content-Length`` against a global budget of body bytes in memory (``max_inflight_body_bytes``,
429 beyond) before reading a byte of it. Bodies are then read as a stream: a raw image is cut
off at ``max_image_bytes``, and a multipart body is parsed as it arrives (python-multipart's
push parser), so each image part is cut off at ``max_image_bytes`` while it is being read and
nothing is spooled to disk. A chunked upload (no ``Content-Length``) takes budget as its bytes
arrive. A refused request leaves its body unread.
"""

from __future__ import annotations

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


async def body_chunks(
    receive: Receive, lease: BudgetLease, budget: SharedBudget, limit: int
) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, counted against ``limit`` (413) and the budget (beyond
    what the request reserved from its Content-Length)."""
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise body_too_large(limit)
        budget.take(lease, received - lease.held)
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def read_raw_body(
    receive: Receive,
    lease: BudgetLease,
    budget: SharedBudget,
    limit: int,
    what: str = "the request body (one image)",
) -> bytes:
    data = bytearray()
    try:
        async for chunk in body_chunks(receive, lease, budget, limit):
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
        async for chunk in body_chunks(receive, lease, budget, body_limit):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequest(f"the multipart body cannot be parsed: {exc}") from None
    except ValueError as exc:  # e.g. a malformed boundary
        raise InvalidRequest(f"the multipart body cannot be parsed: {exc}") from None
    files = [(p.name, bytes(p.data)) for p in form.parts if p.is_file]
    fields = [(p.name, p.data.decode("utf-8", "replace")) for p in form.parts if not p.is_file]
    return MultipartBody(files, fields)
