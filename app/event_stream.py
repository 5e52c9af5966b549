"""Follow a job's events by polling the table, so a watcher on one API process sees
reports that reached another."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db import Sessions, session_scope
from app.models import TERMINAL_STATUSES, Job, JobEvent
from app.store import events, metrics

POLL_S = 0.25
KEEPALIVE_S = 15.0  # a comment now and then keeps proxies from closing an idle stream


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    data: dict[str, Any]


async def follow(
    sessions: Sessions, job_id: str, after_id: int = 0, poll_s: float = POLL_S
) -> AsyncIterator[Event | None]:
    """Events with id > after_id, live, ending with `end` once the job is in a terminal state.

    Yields None after each poll that found nothing, so the caller can keep the line alive.
    """
    while True:
        batch, status = await run_in_threadpool(_poll, sessions, job_id, after_id)
        for event in batch:
            yield event
            after_id = event.id
            if event.kind == "end":
                return
        if not batch:
            if status in TERMINAL_STATUSES or status is None:
                # The client resumed past the stored `end`: close the stream the same way.
                yield Event(id=after_id, kind="end", data={"status": status})
                return
            yield None
            await anyio.sleep(poll_s)


def _poll(sessions: Sessions, job_id: str, after_id: int) -> tuple[list[Event], str | None]:
    with session_scope(sessions) as session:
        rows = events.after(session, job_id, after_id)
        job = session.get(Job, job_id)
        return _expanded(session, job_id, rows), job.status if job else None


def _expanded(session: Session, job_id: str, rows: list[JobEvent]) -> list[Event]:
    """Events as streamed: a metrics event names the chunks its points went to (they are
    not stored twice), and gets them back here, all of a poll's in one query."""
    refs = [row.data["chunks"] for row in rows if row.kind == "metrics" and "chunks" in row.data]
    found = metrics.chunk_points(session, job_id, (key for keys in refs for key in keys))
    out = []
    for row in rows:
        data = row.data
        if row.kind == "metrics" and "chunks" in data:
            data = {"points": [p for key in data["chunks"] for p in found.get(tuple(key), [])]}
        out.append(Event(row.id, row.kind, data))
    return out


async def sse_frames(sessions: Sessions, job_id: str, after_id: int = 0) -> AsyncIterator[bytes]:
    """The wire format of docs/service.md: `id: <row id>\\nevent: <kind>\\ndata: <json>\\n\\n`."""
    quiet_since = time.monotonic()
    async for event in follow(sessions, job_id, after_id):
        if event is None:
            if time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield b": keepalive\n\n"
            continue
        quiet_since = time.monotonic()
        data = json.dumps(event.data, separators=(",", ":"))
        yield f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()
