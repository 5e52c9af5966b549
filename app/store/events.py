"""Job events: the append-only log behind SSE, polled so every API process sees every report.

Ordering: an event id comes from a sequence, and a reader resumes after the last
id it saw, so an event must never commit after a later id did. Every writer
appends only after taking the job's row lock (a guarded UPDATE or
`jobs.lock`), which orders the commits of one job's events by id.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from app.models import JobEvent

KINDS = ("status", "metrics", "checkpoint", "log", "end")


def append(session: Session, job_id: str, kind: str, data: dict[str, Any]) -> JobEvent:
    assert kind in KINDS, kind
    event = JobEvent(job_id=job_id, kind=kind, data=data)
    session.add(event)
    session.flush()
    return event


def after(
    session: Session, job_id: str, after_id: int, limit: int = 500, metrics_after: int = 0
) -> list[JobEvent]:
    """Events with id > after_id, but metrics events only with id > metrics_after (a
    watcher that read the history up to there skips them here, not after reading them)."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id)
    if metrics_after > after_id:
        stmt = stmt.where(or_(JobEvent.kind != "metrics", JobEvent.id > metrics_after))
    return list(session.execute(stmt.order_by(JobEvent.id).limit(limit)).scalars())


def last_id(session: Session, job_id: str) -> int:
    stmt = select(func.max(JobEvent.id)).where(JobEvent.job_id == job_id)
    return session.execute(stmt).scalar_one() or 0


def log_lines(session: Session, job_id: str, tail: int | None = None) -> list[str]:
    stmt = (
        select(JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.kind == "log")
        .order_by(JobEvent.id)
    )
    lines = [line for data in session.execute(stmt).scalars() for line in data.get("lines", [])]
    return lines[-tail:] if tail else lines
