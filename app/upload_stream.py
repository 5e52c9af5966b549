"""The file of an upload, streamed to its destination as it arrives.

Two bodies carry a file: the raw bytes (`Content-Type: application/octet-stream`, the
file's name in the query), and a multipart/form-data form (what browsers and curl -F
send). A raw body is passed on as the server received it; a form goes through
python-multipart's streaming parser (the one Starlette uses), whose pieces of the file
are kept as views of the received chunks, never copied. Either way the file's name is
checked before a byte of it is read, and the bytes go to `write` a few MiB at a time on
a worker thread, so hashing and disk writes never hold up the event loop.

FastAPI's `UploadFile` would spool a whole body to a temp file before the route ran,
which an upload then copied into the artifact store: every byte written twice.
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

# What the event loop gathers for one hop to the writer thread (its ~0.1 ms is paid
# per batch, not per received chunk of ~256 KiB).
WRITE_BYTES = 4 << 20
# Parts besides the file are read past, not kept; a body of thousands of them is not an upload.
MAX_PARTS = 16
RAW = b"application/octet-stream"
FORM = b"multipart/form-data"

Write = Callable[[memoryview], None]


def _missing(where: str, field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "missing", "loc": (where, field), "msg": message}])


class _Pending:
    """Pieces of the file waiting for the writer: views of received chunks, not copies."""

    def __init__(self) -> None:
        self.pieces: list[memoryview] = []
        self.size = 0

    def add(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        piece = memoryview(data)[start:end]
        if not piece:
            return
        if not isinstance(data, bytes):  # a view of a mutable buffer could change under us
            piece = memoryview(bytes(piece))
        self.pieces.append(piece)
        self.size += len(piece)

    def take(self) -> list[memoryview]:
        pieces, self.pieces, self.size = self.pieces, [], 0
        return pieces


class _Parts:
    """Parser callbacks: the headers of each part, and the data of the first `field` part."""

    def __init__(self, field: str, pending: _Pending):
        self.field = field.encode()
        self.pending = pending
        self.parts = 0
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.in_file = False
        self.file_seen = False
        self.file_complete = False
        self.filename: str | None = None
        self.file_started = False  # set when its headers are done; read once by the loop

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
            self.pending.add(data, start, end)

    def on_part_end(self) -> None:
        if self.in_file:
            self.file_complete = True
        self.in_file = False


async def receive_file(
    request: Request,
    field: str,
    name_param: str,
    *,
    on_name: Callable[[str | None], None],
    write: Write,
) -> None:
    """Stream the uploaded file into `write`: the raw body, or the `field` part of a form.

    `on_name(filename)` runs before any of the file's bytes are read (a raw body's name
    is the `name_param` query parameter), so a bad name is refused without reading the
    file. A raw body without a name, or a form without the part, is a 422 at
    `query.<name_param>` or `body.<field>`, like FastAPI's own; a malformed form is a 400.
    """
    content_type, options = parse_options_header(request.headers.get("content-type"))
    writer = _Writer(write)
    try:
        if content_type == RAW:
            name = request.query_params.get(name_param)
            if not name:
                raise _missing(
                    "query",
                    name_param,
                    f"Field required (the file's name, e.g. ?{name_param}=train.npz: "
                    "its suffix says the format)",
                )
            on_name(name)
            await _receive_raw(request, writer)
        elif content_type == FORM and options.get(b"boundary"):
            await _receive_form(request, field, options[b"boundary"], on_name, writer)
        else:
            raise _missing(
                "body",
                field,
                "Field required (send the file as multipart/form-data, or its bytes as "
                f"application/octet-stream with ?{name_param}=)",
            )
        await writer.drain()
    finally:
        # the caller discards the destination next: no write may still be running into it
        await writer.settle()


async def _receive_raw(request: Request, writer: _Writer) -> None:
    pending = _Pending()
    async for chunk in request.stream():
        pending.add(chunk)
        if pending.size >= WRITE_BYTES:
            await writer.send(pending)
    await writer.send(pending)


async def _receive_form(
    request: Request,
    field: str,
    boundary: bytes,
    on_name: Callable[[str | None], None],
    writer: _Writer,
) -> None:
    pending = _Pending()
    parts = _Parts(field, pending)
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
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if parts.file_started:
                parts.file_started = False
                on_name(parts.filename)
            if pending.size >= WRITE_BYTES:
                await writer.send(pending)
        parser.finalize()
    except FormParserError as exc:
        detail = str(exc).strip().splitlines()
        raise BadRequest(
            f"malformed multipart body: {detail[0] if detail else 'unreadable'}"
        ) from None
    if parts.file_started:
        on_name(parts.filename)
    if not parts.file_seen:
        raise _missing("body", field, "Field required")
    if not parts.file_complete:
        raise BadRequest(f"the multipart body ends inside the {field!r} part")
    await writer.send(pending)


class _Writer:
    """Writes on a worker thread, one batch at a time, while the loop receives the next:
    receiving and writing overlap, and the writes stay in order."""

    def __init__(self, write: Write):
        self.write = write
        self.running: asyncio.Future[None] | None = None

    def _write_all(self, pieces: list[memoryview]) -> None:
        for piece in pieces:
            self.write(piece)

    async def send(self, pending: _Pending) -> None:
        if not pending.size:
            return
        pieces = pending.take()
        await self.drain()
        self.running = asyncio.ensure_future(run_in_threadpool(self._write_all, pieces))

    async def drain(self) -> None:
        """Wait for the running write; its error (TooLarge, a full disk) is raised here."""
        running, self.running = self.running, None
        if running is not None:
            await running

    async def settle(self) -> None:
        with contextlib.suppress(Exception):
            await self.drain()
