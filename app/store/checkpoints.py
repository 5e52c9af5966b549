"""Checkpoints keyed by (job, epoch, kind): a retried upload replaces nothing it need not."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.models import Checkpoint, utcnow


@dataclass(frozen=True)
class Recorded:
    checkpoint: Checkpoint
    created: bool  # False: the same file was already recorded (a retry)
    replaced_path: str | None  # a file the new row superseded, to delete after commit


def record(
    session: Session,
    *,
    job_id: str,
    kind: str,
    epoch: int,
    step: int,
    monitor: str | None,
    value: float | None,
    size: int,
    sha256: str,
    path: str,
) -> Recorded:
    existing = session.execute(
        select(Checkpoint).where(
            Checkpoint.job_id == job_id, Checkpoint.epoch == epoch, Checkpoint.kind == kind
        )
    ).scalar_one_or_none()
    if existing is not None and existing.sha256 == sha256:
        return Recorded(existing, created=False, replaced_path=None)
    if existing is not None:
        # A resumed attempt saved this epoch again with different bytes: the newest wins.
        replaced = existing.path if existing.path != path else None
        existing.step, existing.monitor, existing.value = step, monitor, value
        existing.size, existing.sha256, existing.path, existing.created_at = (
            size,
            sha256,
            path,
            utcnow(),
        )
        session.flush()
        return Recorded(existing, created=True, replaced_path=replaced)
    checkpoint = Checkpoint(
        job_id=job_id,
        kind=kind,
        epoch=epoch,
        step=step,
        monitor=monitor,
        value=value,
        size=size,
        sha256=sha256,
        path=path,
    )
    session.add(checkpoint)
    session.flush()
    return Recorded(checkpoint, created=True, replaced_path=None)


def list_for_job(session: Session, job_id: str) -> list[Checkpoint]:
    stmt = (
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id)
        .order_by(Checkpoint.epoch, Checkpoint.kind)
    )
    return list(session.execute(stmt).scalars())


def get(session: Session, job_id: str, checkpoint_id: int) -> Checkpoint:
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None or checkpoint.job_id != job_id:
        raise NotFound(f"no checkpoint {checkpoint_id} in job {job_id!r}")
    return checkpoint


def newest(session: Session, job_id: str, kind: str) -> Checkpoint:
    """The latest checkpoint of a kind (`best` is saved only on improvement: newest is best)."""
    stmt = (
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.kind == kind)
        .order_by(Checkpoint.epoch.desc(), Checkpoint.step.desc())
        .limit(1)
    )
    checkpoint = session.execute(stmt).scalar_one_or_none()
    if checkpoint is None:
        raise NotFound(f"job {job_id!r} has no {kind} checkpoint yet")
    return checkpoint


def exists(session: Session, job_id: str, kind: str) -> bool:
    stmt = (
        select(Checkpoint.id).where(Checkpoint.job_id == job_id, Checkpoint.kind == kind).limit(1)
    )
    return session.execute(stmt).first() is not None
