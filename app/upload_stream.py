"""The file of a multipart/form-data upload, streamed to its destination as it arrives.

FastAPI's `UploadFile` spools a whole body to a temp file before the route runs, which
an upload then copied into the artifact store: every byte written twice, and the
route learnt the file name only after the body was in. Here python-multipart's
streaming parser (the one Starlette uses) hands the file's bytes on as they come: the
name is checked from the part's headers, and the bytes go to `write` about a MiB at a
time on a worker thread, so hashing and disk writes never hold up the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from fastapi.exceptions import RequestValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from app.errors import BadRequest

WRITE_BYTES = 1 << 20
# Parts besides the file are read past, not kept; a body of thousands of them is not an upload.
MAX_PARTS = 16


def _missing(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "missing", "loc": ("body", field), "msg": message}])


class _Parts:
    """Parser callbacks: the headers of each part, and the data of the first `field` part."""

    def __init__(self, field: str):
        self.field = field.encode()
        self.parts = 0
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.in_file = False
        self.file_seen = False
        self.file_complete = False
        self.filename: str | None = None
        self.file_started = False  # set when its headers are done; read once by the loop
        self.pending = bytearray()

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise BadRequest(f"a multipart upload has at most {MAX_PARTS} parts")
        self.disposition = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        self.in_file = options.get(b"name") == self.field and not self.file_seen
        if self.in_file:
            self.file_seen = self.file_started = True
            raw = options.get(b"filename")
            self.filename = raw.decode("utf-8", "replace") if raw is not None else None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.pending += data[start:end]

    def on_part_end(self) -> None:
        if self.in_file:
            self.file_complete = True
        self.in_file = False


async def receive_file(
    request: Request,
    field: str,
    *,
    on_name: Callable[[str | None], None],
    write: Callable[[bytes], None],
) -> None:
    """Stream the `field` part of the request body into `write`.

    `on_name(filename)` runs as soon as the part's headers are in, before any of its
    data, so a bad name is refused without reading the file. A body without the part is
    a 422 at `body.<field>`, like FastAPI's own; a malformed one is a 400.
    """
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise _missing(field, "Field required (send the file as multipart/form-data)")
    parts = _Parts(field)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": parts.on_part_begin,
            "on_header_field": parts.on_header_field,
            "on_header_value": parts.on_header_value,
            "on_header_end": parts.on_header_end,
            "on_headers_finished": parts.on_headers_finished,
            "on_part_data": parts.on_part_data,
            "on_part_end": parts.on_part_end,
        },
    )
    writer = _Writer(write)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if parts.file_started:
                parts.file_started = False
                on_name(parts.filename)
            if len(parts.pending) >= WRITE_BYTES:
                await writer.send(parts)
        parser.finalize()
        if parts.file_started:
            on_name(parts.filename)
        if not parts.file_seen:
            raise _missing(field, "Field required")
        if not parts.file_complete:
            raise BadRequest(f"the multipart body ends inside the {field!r} part")
        await writer.send(parts)
        await writer.drain()
    except FormParserError as exc:
        detail = str(exc).strip().splitlines()
        raise BadRequest(
            f"malformed multipart body: {detail[0] if detail else 'unreadable'}"
        ) from None
    finally:
        # the caller discards the destination next: no write may still be running into it
        await writer.settle()


class _Writer:
    """Writes on a worker thread, one at a time, while the loop receives the next MiB:
    receiving and writing overlap, and the writes stay in order."""

    def __init__(self, write: Callable[[bytes], None]):
        self.write = write
        self.running: asyncio.Future[None] | None = None

    async def send(self, parts: _Parts) -> None:
        if not parts.pending:
            return
        data = bytes(parts.pending)
        parts.pending.clear()
        await self.drain()
        self.running = asyncio.ensure_future(run_in_threadpool(self.write, data))

    async def drain(self) -> None:
        """Wait for the running write; its error (TooLarge, a full disk) is raised here."""
        running, self.running = self.running, None
        if running is not None:
            await running

    async def settle(self) -> None:
        with contextlib.suppress(Exception):
            await self.drain()
