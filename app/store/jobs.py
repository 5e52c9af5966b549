"""Jobs: creation, reads, and state transitions guarded by the expected current state.

Every transition is `UPDATE jobs SET ... WHERE id = :id AND status = :expected`,
so of two racing writers (two workers, a worker and the reconciler, a cancel and
a claim) exactly one wins, and a terminal state never changes again.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Row, bindparam, func, select, update
from sqlalchemy.orm import Session

from app.async_reads import AsyncReads
from app.db import read_scope
from app.errors import Conflict, NotFound
from app.ids import is_id, new_id
from app.models import TERMINAL_STATUSES, Job, JobDataset, JobEvent, User, utcnow
from app.store import events


def create(
    session: Session,
    *,
    user_id: int,
    name: str,
    spec: dict[str, Any],
    fields: dict[str, Any],
    queue: str,
    max_restarts: int,
    dataset_ids: Collection[str],
) -> Job:
    now = utcnow()
    job = Job(
        id=new_id(),
        user_id=user_id,
        name=name,
        status="queued",
        spec=spec,
        fields=fields,
        queue=queue,
        attempt=1,
        max_restarts=max_restarts,
        created_at=now,
        dispatched_at=now,
        latest_metrics={},
    )
    session.add(job)
    session.flush()
    session.add_all(JobDataset(job_id=job.id, dataset_id=d) for d in sorted(set(dataset_ids)))
    events.append(session, job.id, "status", {"status": "queued", "attempt": 1})
    return job


JOBS = Job.__table__
# What a job's answer shows (JobOut), as a row: polling GET /jobs/{id} is the API's
# hottest read. The statement is built once (a fresh select() per call, and ORM
# loading, cost more Python than Postgres spends answering the query).
SHOWN = (
    "id",
    "name",
    "status",
    "queue",
    "created_at",
    "started_at",
    "finished_at",
    "attempt",
    "max_restarts",
    "cancel_requested",
    "error",
    "progress",
    "result",
    "latest_metrics",
    "best_epoch",
    "best_monitor",
    "best_value",
    "stopped_early",
    "stop_reason",
    "spec",
)
# The jobs of many ids at once, with their owner, for coalesced polls (`shown_by_id`).
_SHOWN_BY_IDS = select(JOBS.c.user_id, *(JOBS.c[name] for name in SHOWN)).where(
    JOBS.c.id.in_(bindparam("ids", expanding=True))
)
_SHOWN_BY_IDS_SQL = f"SELECT user_id, {', '.join(SHOWN)} FROM jobs WHERE id = ANY(%s)"


async def shown_by_id(reads: AsyncReads, engine: Engine, job_ids: list[str]) -> dict[str, Any]:
    """The jobs as their answers show them (columns SHOWN, and user_id), by id, in one
    query: on the event loop's own connection where the database allows (Postgres)."""

    def in_thread() -> list[Row[Any]]:
        with read_scope(engine) as connection:
            return list(connection.execute(_SHOWN_BY_IDS, {"ids": job_ids}))

    rows = await reads.fetch_all(_SHOWN_BY_IDS_SQL, (job_ids,), in_thread)
    return {row.id: row for row in rows}


def owners(session: Session, job_ids: Collection[str]) -> dict[str, tuple[int, int]]:
    """(user id, id of its latest event) of each job found, by job id.

    Every report appends an event under the job's row lock, so a job's event ids
    grow in commit order: an unchanged latest id means nothing was reported since.
    """
    if not job_ids:
        return {}
    latest = (
        select(func.coalesce(func.max(JobEvent.id), 0))
        .where(JobEvent.job_id == JOBS.c.id)
        .scalar_subquery()
    )
    stmt = select(JOBS.c.id, JOBS.c.user_id, latest).where(JOBS.c.id.in_(list(job_ids)))
    return {job_id: (user_id, version) for job_id, user_id, version in session.execute(stmt)}


def get(session: Session, user_id: int, job_id: str) -> Job:
    """The user's job; another user's job is as absent as a missing one."""
    # Not an id at all ('..', a NUL byte): absent, without asking the database.
    job = session.get(Job, job_id, populate_existing=True) if is_id(job_id) else None
    if job is None or job.user_id != user_id:
        raise NotFound(f"no job {job_id!r}")
    return job


def lock(session: Session, job_id: str) -> Job:
    """Read the job under its row lock (Postgres; SQLite's write transaction excludes others)."""
    if not is_id(job_id):
        raise NotFound(f"no job {job_id!r}")
    stmt = (
        select(Job)
        .where(Job.id == job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    job = session.execute(stmt).scalar_one_or_none()
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


def lock_user(session: Session, user_id: int) -> None:
    """Serialise per-user decisions (the running-jobs limit) between concurrent claims."""
    session.execute(select(User.id).where(User.id == user_id).with_for_update())


def list_page(
    session: Session, user_id: int, *, status: str | None, limit: int, before_id: str | None
) -> tuple[list[Job], str | None]:
    """Newest first; returns the page and the id to continue before (None at the end)."""
    stmt = select(Job).where(Job.user_id == user_id)
    if status:
        stmt = stmt.where(Job.status == status)
    if before_id:
        stmt = stmt.where(Job.id < before_id)
    rows = list(session.execute(stmt.order_by(Job.id.desc()).limit(limit + 1)).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


def transition(session: Session, job_id: str, expected: str, **values: Any) -> bool:
    """Move a job out of `expected`; False when it was no longer in that state."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == expected)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]


def cancel(session: Session, user_id: int, job_id: str) -> Job:
    """Queued: cancelled at once. Running: flag it; the worker sees `cancel: true` and stops."""
    get(session, user_id, job_id)
    job = lock(session, job_id)
    if job.status == "queued":
        now = utcnow()
        if transition(
            session,
            job_id,
            "queued",
            status="cancelled",
            finished_at=now,
            stop_reason="cancelled by user",
        ):
            announce_end(session, job_id, "cancelled", stop_reason="cancelled by user")
    elif job.status == "running":
        if not job.cancel_requested and transition(
            session, job_id, "running", cancel_requested=True
        ):
            events.append(
                session, job_id, "status", {"status": "running", "cancel_requested": True}
            )
    elif job.status != "cancelled":
        raise Conflict(f"job {job_id!r} already {job.status}")
    return get(session, user_id, job_id)


def finish_values(status: str, now: datetime, **values: Any) -> dict[str, Any]:
    """Columns every move into a terminal state sets."""
    assert status in TERMINAL_STATUSES
    return {"status": status, "finished_at": now, "lease_expires_at": None, **values}


def announce_end(
    session: Session,
    job_id: str,
    status: str,
    *,
    error: str | None = None,
    stop_reason: str | None = None,
) -> None:
    """The events of a move into a terminal state: its status, then `end` for SSE watchers."""
    data: dict[str, Any] = {"status": status}
    if error:
        data["error"] = error
    if stop_reason:
        data["stop_reason"] = stop_reason
    events.append(session, job_id, "status", data)
    events.append(session, job_id, "end", {"status": status})


def counts_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {status: count for status, count in rows}


def queued_by_queue(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Job.queue, func.count()).where(Job.status == "queued").group_by(Job.queue)
    )
    return {queue: count for queue, count in rows}


def running_count(session: Session, user_id: int) -> int:
    stmt = select(func.count()).where(Job.user_id == user_id, Job.status == "running")
    return session.execute(stmt).scalar_one()


def expired_leases(session: Session, now: datetime) -> list[Job]:
    stmt = (
        select(Job)
        .where(Job.status == "running", Job.lease_expires_at < now)
        .order_by(Job.id)
        .with_for_update(skip_locked=True)
    )
    return list(session.execute(stmt).scalars())


def stale_queued(
    session: Session, dispatched_before: datetime, queue: str, limit: int
) -> list[Job]:
    """Queued jobs last sent before `dispatched_before`, longest waiting first."""
    stmt = (
        select(Job)
        .where(Job.status == "queued", Job.queue == queue)
        .where((Job.dispatched_at.is_(None)) | (Job.dispatched_at < dispatched_before))
        .order_by(Job.dispatched_at, Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(session.execute(stmt).scalars())
