"""Jobs: creation, reads, and state transitions guarded by the expected current state.

Every transition is `UPDATE jobs SET ... WHERE id = :id AND status = :expected`,
so of two racing writers (two workers, a worker and the reconciler, a cancel and
a claim) exactly one wins, and a terminal state never changes again.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Engine, Row, Select, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from app.async_reads import AsyncReads
from app.db import read_scope
from app.errors import Conflict, NotFound
from app.ids import is_id, new_id
from app.models import (
    TERMINAL_STATUSES,
    Job,
    JobDataset,
    JobEvent,
    JobTag,
    User,
    utcnow,
)
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
    project: str = "default",
    tags: Sequence[str] = (),
    note: str = "",
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
        project=project,
        tags=list(tags),
        note=note,
    )
    session.add(job)
    session.flush()
    session.add_all(JobDataset(job_id=job.id, dataset_id=d) for d in sorted(set(dataset_ids)))
    session.add_all(JobTag(job_id=job.id, tag=tag, user_id=user_id) for tag in set(tags))
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
    "project",
    "tags",
    "note",
    "fields",  # JobOut shows fields["sources"]
    "disk_bytes",
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


Sort = Literal["created", "best"]


@dataclass(frozen=True)
class JobQuery:
    """What GET /jobs asks for: filters, combined with AND, and an order."""

    project: str | None = None
    tags: tuple[str, ...] = ()  # every one must match
    status: str | None = None
    name: str | None = None  # a substring, case-insensitive
    sort: Sort = "created"
    descending: bool = True


@dataclass(frozen=True)
class Position:
    """The sort key of the last job of a page: the next page starts after it."""

    id: str
    best_value: float | None = None


# What a job's line in a list shows (JobSummary), and its sort keys: not the spec, the
# result or the metrics, which would cost more to read and decode than the search.
LISTED = (
    "id",
    "name",
    "status",
    "queue",
    "created_at",
    "started_at",
    "finished_at",
    "attempt",
    "cancel_requested",
    "error",
    "project",
    "tags",
    "note",
    "best_value",
    # the dashboard's table: epoch x/y, ETA and the best (a small JSON and two columns)
    "progress",
    "best_epoch",
    "best_monitor",
)


def search(
    session: Session, user_id: int, query: JobQuery, *, limit: int, after: Position | None
) -> tuple[list[Row[Any]], Position | None]:
    """A page of the user's jobs, and where the next starts (None at the end).

    Keyset pagination: the next page is "after this sort key", so jobs submitted or
    deleted meanwhile neither repeat nor skip others. Ids grow with creation time, so
    `created` is the order of ids; `best` is the best monitored value, ties by id in
    the same direction, jobs without one last. Rows have the columns LISTED.
    """
    stmt = select(*(JOBS.c[name] for name in LISTED)).where(Job.user_id == user_id)
    if query.project is not None:
        stmt = stmt.where(Job.project == query.project)
    if query.status is not None:
        stmt = stmt.where(Job.status == query.status)
    if query.name:
        stmt = stmt.where(Job.name.icontains(query.name, autoescape=True))
    for tag in sorted(set(query.tags)):
        # one join a tag, each an index lookup of (user, tag, job)
        tagged = aliased(JobTag)
        stmt = stmt.join(
            tagged, (tagged.job_id == Job.id) & (tagged.user_id == user_id) & (tagged.tag == tag)
        )
    if query.sort == "created":
        stmt = _after_created(stmt, after, query.descending)
        order: tuple[Any, ...] = (Job.id.desc() if query.descending else Job.id.asc(),)
    else:
        stmt = _after_best(stmt, after, query.descending)
        if query.descending:
            order = (Job.best_value.desc().nulls_last(), Job.id.desc())
        else:
            order = (Job.best_value.asc().nulls_last(), Job.id.asc())
    rows = list(session.execute(stmt.order_by(*order).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], Position(last.id, last.best_value)


def _after_created(stmt: Select[Any], after: Position | None, descending: bool) -> Select[Any]:
    if after is None:
        return stmt
    return stmt.where(Job.id < after.id if descending else Job.id > after.id)


def _after_best(stmt: Select[Any], after: Position | None, descending: bool) -> Select[Any]:
    if after is None:
        return stmt
    later_id = Job.id < after.id if descending else Job.id > after.id
    if after.best_value is None:  # already among the jobs without a value, which come last
        return stmt.where(Job.best_value.is_(None), later_id)
    value = after.best_value
    later_value = Job.best_value < value if descending else Job.best_value > value
    return stmt.where(
        or_(later_value, and_(Job.best_value == value, later_id), Job.best_value.is_(None))
    )


@dataclass(frozen=True)
class Project:
    name: str
    jobs: int
    by_status: dict[str, int]


def projects(session: Session, user_id: int) -> list[Project]:
    """The user's projects by name, with their jobs counted by status."""
    stmt = (
        select(Job.project, Job.status, func.count())
        .where(Job.user_id == user_id)
        .group_by(Job.project, Job.status)
    )
    counts: dict[str, dict[str, int]] = {}
    for project, status, count in session.execute(stmt):
        counts.setdefault(project, {})[status] = count
    return [
        Project(name, sum(by_status.values()), dict(sorted(by_status.items())))
        for name, by_status in sorted(counts.items())
    ]


def edit(
    session: Session,
    user_id: int,
    job_id: str,
    *,
    project: str | None = None,
    tags: Sequence[str] | None = None,
    note: str | None = None,
) -> Job:
    """Set a job's metadata (None: keep), in any state: it is not part of the run.

    The stored spec document follows, so a spec read back from the job and
    submitted again carries the metadata the job has now.
    """
    get(session, user_id, job_id)
    job = lock(session, job_id)
    changed: dict[str, Any] = {}
    if project is not None and project != job.project:
        job.project = changed["project"] = project
    if tags is not None:
        tags = list(dict.fromkeys(tags))
        if tags != job.tags:
            job.tags = changed["tags"] = tags
            _set_tags(session, job, set(tags))
    if note is not None and note != job.note:
        job.note = changed["note"] = note
    if changed:
        job.spec = {**job.spec, **changed}  # a new dict: the JSON column sees the change
        session.flush()
    return job


def _set_tags(session: Session, job: Job, tags: set[str]) -> None:
    stored = set(session.execute(select(JobTag.tag).where(JobTag.job_id == job.id)).scalars())
    if stored - tags:
        session.execute(
            delete(JobTag).where(JobTag.job_id == job.id, JobTag.tag.in_(sorted(stored - tags)))
        )
    session.add_all(
        JobTag(job_id=job.id, tag=tag, user_id=job.user_id) for tag in sorted(tags - stored)
    )


def delete_finished(session: Session, user_id: int, job_id: str) -> None:
    """Delete a finished job's rows (the caller removes its files after commit); a
    queued or running job is a Conflict: cancel it first.

    Its metric chunks, rollups, events (logs among them), checkpoints, attempts, tags
    and dataset links go with it by ON DELETE CASCADE, in this one transaction.
    """
    get(session, user_id, job_id)
    job = lock(session, job_id)
    if job.status not in TERMINAL_STATUSES:
        raise Conflict(
            f"job {job_id!r} is {job.status}; cancel it first (POST /api/v1/jobs/{job_id}/cancel)"
        )
    session.execute(delete(Job).where(Job.id == job_id))


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
