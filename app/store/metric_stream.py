"""Full metric histories streamed: read a page of chunks at a time, encoded as it is read.

A whole history (GET /jobs/{id}/metrics without max_points) can be millions of
points: built as one document, a 1,000,000-point series took ~600 MB of Python
objects for a 70 MB answer. Here the chunks' step ranges and sizes are read first
(a few bytes a chunk), cut into pages of about PAGE_POINTS points, and each page
is read in a short read of its own and encoded before the next: an answer of any
size holds about a page in memory, and no transaction stays open while a slow
client reads.

Two shapes, the same points:
- points: `{name: [{"step", "epoch", "value", "time"}, ...]}` (as ever);
- columnar: `{name: {"step": [...], "epoch": [...], "value": [...], "time": [...]}}`,
  what chart libraries take: about half the bytes, and encoded by orjson straight
  from the packed arrays (no Python object per point). Each column is a pass over
  the series' pages, reading the steps and that column.

A null value (NaN, Inf) is null in both. A page that a later report changes (a
small batch appended to a chunk) is read as it is when its turn comes.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import orjson
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from app.db import Sessions, session_scope
from app.store import jobs
from app.store.metrics import CHUNKS, DTYPES, as_points, merged_arrays

PAGE_POINTS = 32_768  # ~2 MB of JSON and ~10 MB of short-lived objects a page (points)
WRITE_BYTES = 1 << 16  # small pieces (names, brackets) go out with the next page
COLUMNS = {"step": "steps", "epoch": "epochs", "value": "values", "time": "times"}


@dataclass(frozen=True, slots=True)
class Span:
    """A chunk's key, step range and size."""

    first: int
    last: int
    count: int


@dataclass(frozen=True)
class Plan:
    """What to stream: per name (sorted), its pages of chunks; and the step range."""

    job_id: str
    series: dict[str, list[list[Span]]]
    after: int | None
    before: int | None


def open_history(
    sessions: Sessions,
    job_id: str,
    user_id: int,
    *,
    names: Collection[str] = (),
    since_step: int | None = None,
    until_step: int | None = None,
    columnar: bool = False,
) -> Iterator[bytes] | None:
    """The answer's pieces, or None when the job is missing or another user's.

    `sessions`: read sessions (app.db.make_read_sessions): the owner check and the
    plan are one short read, and each page another.
    """
    with session_scope(sessions) as session:
        owner = jobs.owners(session, [job_id]).get(job_id)
        if owner is None or owner[0] != user_id:
            return None
        plan = _plan(session, job_id, names, since_step, until_step)
    return _coalesced(_encode(sessions, plan, columnar))


def _plan(
    session: Session,
    job_id: str,
    names: Collection[str],
    since_step: int | None,
    until_step: int | None,
) -> Plan:
    stmt = select(CHUNKS.c.name, CHUNKS.c.first_step, CHUNKS.c.last_step, CHUNKS.c["count"]).where(
        CHUNKS.c.job_id == job_id
    )
    if names:
        stmt = stmt.where(CHUNKS.c.name.in_(list(names)))
    if since_step is not None:
        stmt = stmt.where(CHUNKS.c.last_step > since_step)
    if until_step is not None:
        stmt = stmt.where(CHUNKS.c.first_step <= until_step)
    rows = session.execute(stmt.order_by(CHUNKS.c.name, CHUNKS.c.first_step))
    series = {
        name: _pages([Span(first, last, count) for _, first, last, count in group])
        for name, group in itertools.groupby(rows, key=lambda row: row[0])
    }
    before = None if until_step is None else until_step + 1
    return Plan(job_id, series, since_step, before)


def _pages(spans: list[Span]) -> list[list[Span]]:
    """Spans (by first step) cut into pages of about PAGE_POINTS points. Chunks whose step
    ranges overlap (late or retried batches) stay on one page, where they are merged by
    step; pages then follow each other in step order."""
    pages: list[list[Span]] = []
    page: list[Span] = []
    points = 0
    reach = None  # the highest last step on the current page
    for span in spans:
        overlaps = reach is not None and span.first <= reach
        if page and not overlaps and points + span.count > PAGE_POINTS:
            pages.append(page)
            page, points, reach = [], 0, None
        page.append(span)
        points += span.count
        reach = span.last if reach is None else max(reach, span.last)
    if page:
        pages.append(page)
    return pages


def _read(
    sessions: Sessions,
    plan: Plan,
    name: str,
    page: list[Span],
    columns: Iterable[str],
    before: int | None,
) -> list[np.ndarray]:
    """The page's columns (steps first), merged by step, plan.after < step < before."""
    wanted = ["steps", *(c for c in columns if c != "steps")]
    stmt = select(*(CHUNKS.c[c] for c in wanted)).where(
        CHUNKS.c.job_id == plan.job_id,
        tuple_(CHUNKS.c.name, CHUNKS.c.first_step).in_([(name, s.first) for s in page]),
    )
    with session_scope(sessions) as session:
        rows = [tuple(row) for row in session.execute(stmt)]
    if not rows:
        return [np.empty(0) for _ in wanted]
    return merged_arrays(rows, after=plan.after, before=before, dtypes=[DTYPES[c] for c in wanted])


def _encode(sessions: Sessions, plan: Plan, columnar: bool) -> Iterator[bytes]:
    yield b"{"
    shown = 0
    for name, pages in plan.series.items():
        head = (b"," if shown else b"") + orjson.dumps(name) + b":"
        body = (
            _columnar(sessions, plan, name, pages)
            if columnar
            else _points(sessions, plan, name, pages)
        )
        first = next(body, None)
        if first is None:
            continue  # no point in the range: the name is left out, as in a short answer
        shown += 1
        yield head + first
        yield from body
    yield b"}"


def _points(sessions: Sessions, plan: Plan, name: str, pages: list[list[Span]]) -> Iterator[bytes]:
    """`[{...}, ...]`, a page at a time; nothing at all when the range holds no point."""
    opened = False
    for page in pages:
        arrays = _read(sessions, plan, name, page, DTYPES, plan.before)
        if not len(arrays[0]):
            continue
        rows = [
            {"step": p[0], "epoch": p[1], "value": p[2], "time": p[3]} for p in as_points(*arrays)
        ]
        yield (b"," if opened else b"[") + orjson.dumps(rows)[1:-1]
        opened = True
    if opened:
        yield b"]"


def _columnar(
    sessions: Sessions, plan: Plan, name: str, pages: list[list[Span]]
) -> Iterator[bytes]:
    """`{"step": [...], ...}`, a column at a time (each a pass over the pages); nothing at
    all when the range holds no point. The later passes stop at the last step the first
    one saw, so a small batch appended meanwhile cannot make the columns unequal."""
    before = plan.before
    for n, (key, column) in enumerate(COLUMNS.items()):
        opened = False
        for page in pages:
            arrays = _read(sessions, plan, name, page, [column], before)
            if not len(arrays[0]):
                continue
            if n == 0:
                last = int(arrays[0][-1])
            encoded = orjson.dumps(arrays[-1], option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
            yield (
                b"," if opened else (b"{" if n == 0 else b",") + b'"' + key.encode() + b'":['
            ) + encoded
            opened = True
        if n == 0:
            if not opened:
                return  # no step in the range: no point
            before = last + 1
        elif not opened:
            yield b',"' + key.encode() + b'":['
        yield b"]"
    yield b"}"


def _coalesced(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """The pieces joined into writes of at least WRITE_BYTES (the last one may be less):
    each write of a streamed answer costs a thread hop and a send."""
    buffer: list[bytes] = []
    size = 0
    for piece in pieces:
        buffer.append(piece)
        size += len(piece)
        if size >= WRITE_BYTES:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)
