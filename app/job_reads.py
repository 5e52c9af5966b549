"""The read models of the polled routes: the kept, coalesced answers of GET /jobs/{id}
and GET /jobs/{id}/metrics, and the event polls of GET /jobs/{id}/events.

One `ReadModels` per API process, made by the app factory (`app.main.create_app`)
and reached by routes through `app.api.deps` (`ReadModelsDep`, or `read_models(request)`
on the hot paths that skip dependency solving). Answers are kept as the bytes the
route sends; how a job is shown (`JobOut`, app.api.schemas) is handed in by the
factory, so this layer does not import the API's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from app.async_reads import AsyncReads, Coalesced
from app.db import Sessions, make_read_sessions, read_engine, session_scope
from app.event_stream import EventPolls
from app.ids import is_id
from app.store import jobs, metric_stream, metrics

ShownKey = tuple[str, int]  # (job id, user id)
RenderJob = Callable[[Any], bytes]  # a row of `jobs.shown_by_id` -> the JSON of GET /jobs/{id}
# (job, user, names, since_step, max_points, until_step, columnar)
HistoryKey = tuple[str, int, tuple[str, ...], int | None, int | None, int | None, bool]
KEPT_HISTORIES = 1_000  # answers an API process keeps (see `MetricHistories`)


class ShownJobs:
    """The answers of GET /jobs/{id} by (job id, user id), coalesced (app.async_reads):
    polls made at the same moment share one query and one rendering of each job."""

    def __init__(self, reads: AsyncReads, engine: Engine, render: RenderJob):
        self._reads = reads
        self._engine = engine
        self._render = render
        self._batches: Coalesced[ShownKey, bytes] = Coalesced(self._fetch)

    async def get(self, job_id: str, user_id: int) -> bytes | None:
        """The job's JSON if it is the user's; None if missing or another user's."""
        if not is_id(job_id):  # '..', a NUL byte: absent, without asking the database
            return None
        return await self._batches.get((job_id, user_id))

    async def _fetch(self, keys: list[ShownKey]) -> dict[ShownKey, bytes]:
        ids = sorted({job_id for job_id, _ in keys})
        rows = await jobs.shown_by_id(self._reads, self._engine, ids)
        rendered: dict[str, bytes] = {}
        out = {}
        for job_id, user_id in keys:
            row = rows.get(job_id)
            if row is not None and row.user_id == user_id:
                if job_id not in rendered:
                    rendered[job_id] = self._render(row)
                out[(job_id, user_id)] = rendered[job_id]
        return out


class MetricHistories:
    """Downsampled answers of GET /jobs/{id}/metrics by (job, user, names, since_step,
    max_points, until_step, columnar), coalesced (app.async_reads): the reads of a
    batch in one thread and transaction. A whole history (no max_points) is streamed
    instead (`stream`), neither shared nor kept: an answer of any size cannot be.

    An answer is kept with the id of the job's latest event when it was read, and
    given again while that id is unchanged (a job's event ids grow in commit order,
    and every metrics report appends one): dashboards polling a job between two of
    its worker's reports share one read. The id is read after the poll arrived, so
    a poll still sees everything committed before it.
    """

    def __init__(self, sessions: Sessions, read_sessions: Sessions, kept: int = KEPT_HISTORIES):
        self._sessions = sessions
        self._read_sessions = read_sessions
        self._most_kept = kept
        self._kept: dict[HistoryKey, tuple[int, bytes]] = {}
        self._batches: Coalesced[HistoryKey, tuple[int, bytes]] = Coalesced(
            self._fetch, in_flight=2
        )

    async def get(
        self,
        job_id: str,
        user_id: int,
        *,
        names: str | None = None,
        since_step: int | None = None,
        max_points: int,
        until_step: int | None = None,
        columnar: bool = False,
    ) -> tuple[int, bytes] | None:
        """(the id of the job's latest event when it was read, the downsampled history as
        JSON) (`names`: comma-separated, all when absent); None if the job is missing or
        another user's. Events after that id hold only what the history may lack: a
        watcher reads the history, then follows the events from there."""
        if not is_id(job_id):
            return None
        key = (job_id, user_id, wanted_names(names), since_step, max_points, until_step, columnar)
        return await self._batches.get(key)

    async def stream(
        self,
        job_id: str,
        user_id: int,
        *,
        names: str | None = None,
        since_step: int | None = None,
        until_step: int | None = None,
        columnar: bool = False,
    ) -> Iterator[bytes] | None:
        """The whole history's JSON in pieces, encoded as it is read
        (app/store/metric_stream.py); None if the job is missing or another user's."""
        if not is_id(job_id):
            return None
        return await run_in_threadpool(
            metric_stream.open_history,
            self._read_sessions,
            job_id,
            user_id,
            names=wanted_names(names),
            since_step=since_step,
            until_step=until_step,
            columnar=columnar,
        )

    async def _fetch(self, keys: list[HistoryKey]) -> dict[HistoryKey, tuple[int, bytes]]:
        return await run_in_threadpool(self._read, keys)

    def _read(self, keys: list[HistoryKey]) -> dict[HistoryKey, tuple[int, bytes]]:
        with session_scope(self._sessions) as session:
            found = jobs.owners(session, sorted({key[0] for key in keys}))
            out = {}
            for key in keys:
                job_id, user_id, names, since_step, max_points, until_step, columnar = key
                owner, version = found.get(job_id, (None, 0))
                if owner != user_id:
                    continue
                hit = self._kept.get(key)
                if hit is not None and hit[0] == version:
                    out[key] = hit
                    continue
                history = metrics.history(
                    session,
                    job_id,
                    names=names,
                    since_step=since_step,
                    until_step=until_step,
                    max_points=max_points,
                )
                body = orjson.dumps(metrics.columnar(history) if columnar else history)
                out[key] = (version, body)
                if len(self._kept) >= self._most_kept:
                    self._kept.clear()
                self._kept[key] = out[key]
            return out


def wanted_names(names: str | None) -> tuple[str, ...]:
    """`names` of a history request (comma-separated; all when absent), as a key."""
    return tuple(sorted({n.strip() for n in (names or "").split(",") if n.strip()}))


@dataclass(frozen=True)
class ReadModels:
    """The read models of one API process (see the module docstring)."""

    async_reads: AsyncReads
    jobs: ShownJobs
    histories: MetricHistories
    events: EventPolls

    @classmethod
    def create(cls, engine: Engine, sessions: Sessions, render_job: RenderJob) -> ReadModels:
        async_reads = AsyncReads(engine)
        return cls(
            async_reads=async_reads,
            jobs=ShownJobs(async_reads, read_engine(engine), render_job),
            histories=MetricHistories(sessions, make_read_sessions(engine)),
            events=EventPolls(sessions),
        )

    async def close(self) -> None:
        await self.async_reads.close()
