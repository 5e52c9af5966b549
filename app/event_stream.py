"""Follow a job's events by polling the table, so a watcher on one API process sees
reports that reached another.

The watchers of an API process poll together: each sleeps to the next tick of a
shared clock (every POLL_S), and the polls of one tick go to the database as one
batch (`EventPolls`, app.async_reads.Coalesced): one transaction a tick, one
query per job and cursor, and each event's frame rendered once for all who
send it. Twenty watchers of a job cost about what one does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import anyio
import orjson
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.async_reads import Coalesced
from app.db import Sessions, session_scope
from app.models import TERMINAL_STATUSES, Job, JobEvent
from app.store import events, metrics

POLL_S = 0.25
BATCH = 500  # events a poll reads at most for one watcher
KEEPALIVE_S = 15.0  # a comment now and then keeps proxies from closing an idle stream


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    data: dict[str, Any]

    @cached_property
    def frame(self) -> bytes:
        """The wire format of docs/service.md: `id: <row id>\\nevent: <kind>\\ndata: <json>\\n\\n`
        (rendered once, however many watchers send it)."""
        data = orjson.dumps(self.data)
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (self.id, self.kind.encode(), data)


Polled = tuple[list[Event], str | None]  # events after a cursor, and the job's status
PollKey = tuple[str, int, int]  # (job id, after id, metrics after id: see events.after)


class EventPolls:
    """The event polls of one API process, made together (see the module docstring)."""

    def __init__(self, sessions: Sessions, poll_s: float = POLL_S):
        self.sessions = sessions
        self.poll_s = poll_s
        self._polls: Coalesced[PollKey, Polled] = Coalesced(self._fetch, in_flight=1, gather=True)

    async def poll(self, job_id: str, after_id: int, metrics_after: int = 0) -> Polled:
        # once the cursor is past metrics_after it no longer matters: keys meet again
        skip = metrics_after if metrics_after > after_id else 0
        polled = await self._polls.get((job_id, after_id, skip))
        assert polled is not None
        return polled

    async def until_next_tick(self) -> None:
        await anyio.sleep(self.poll_s - time.monotonic() % self.poll_s)

    async def _fetch(self, keys: list[PollKey]) -> dict[PollKey, Polled]:
        return await run_in_threadpool(_poll_many, self.sessions, keys)


def _poll_many(sessions: Sessions, keys: list[PollKey]) -> dict[PollKey, Polled]:
    with session_scope(sessions) as session:
        statuses: dict[str, str | None] = {}
        out: dict[PollKey, Polled] = {}
        for job_id, after_id, metrics_after in keys:
            if job_id not in statuses:
                job = session.get(Job, job_id)
                statuses[job_id] = job.status if job else None
            rows = events.after(session, job_id, after_id, BATCH, metrics_after)
            polled = (_expanded(session, job_id, rows), statuses[job_id])
            out[(job_id, after_id, metrics_after)] = polled
        return out


def _expanded(session: Session, job_id: str, rows: list[JobEvent]) -> list[Event]:
    """Events as streamed: a metrics event names the chunks its points went to (they are
    not stored twice), and gets them back here, all of a poll's in one query; a status
    event gets its row's time as `at`."""
    refs = [row.data["chunks"] for row in rows if row.kind == "metrics" and "chunks" in row.data]
    found = metrics.chunk_points(session, job_id, (key for keys in refs for key in keys))
    out = []
    for row in rows:
        data = row.data
        if row.kind == "metrics" and "chunks" in data:
            data = {"points": [p for key in data["chunks"] for p in found.get(tuple(key), [])]}
        elif row.kind == "status":
            data = {**data, "at": row.created_at.isoformat()}  # when the job changed state
        out.append(Event(row.id, row.kind, data))
    return out


async def follow(
    polls: EventPolls, job_id: str, after_id: int = 0, metrics_after: int = 0
) -> AsyncIterator[list[Event]]:
    """Events with id > after_id (metrics events only past metrics_after), live, a poll's
    at a time, ending with `end` once the job is in a terminal state.

    Yields an empty list after each poll that found nothing, so the caller can keep the
    line alive. A full batch (a client catching up) is followed by the next at once;
    otherwise the next poll waits for the next tick.
    """
    while True:
        batch, status = await polls.poll(job_id, after_id, metrics_after)
        for n, event in enumerate(batch):
            if event.kind == "end":
                yield batch[: n + 1]
                return
        if batch:
            yield batch
            after_id = batch[-1].id
            if len(batch) >= BATCH:
                continue
        elif status in TERMINAL_STATUSES or status is None:
            # The client resumed past the stored `end`: close the stream the same way.
            yield [Event(id=after_id, kind="end", data={"status": status})]
            return
        else:
            yield []
        await polls.until_next_tick()


async def sse_frames(
    polls: EventPolls, job_id: str, after_id: int = 0, metrics_after: int = 0
) -> AsyncIterator[bytes]:
    """The job's events as SSE frames, a poll's in one write, with a keepalive comment on
    a quiet line."""
    quiet_since = time.monotonic()
    async for batch in follow(polls, job_id, after_id, metrics_after):
        if batch:
            quiet_since = time.monotonic()
            yield b"".join(event.frame for event in batch)
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield b": keepalive\n\n"
