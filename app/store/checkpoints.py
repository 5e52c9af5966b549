"""Checkpoints keyed by (job, epoch, kind): a retried upload replaces nothing it need not."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.models import Checkpoint, utcnow


@dataclass(frozen=True)
class Recorded:
    checkpoint: Checkpoint
    created: bool  # False: the same file was already recorded (a retry)
    replaced_path: str | None  # a file the new row superseded: unlink it after commit if unnamed


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


def with_sha(session: Session, job_id: str, sha256: str) -> Checkpoint | None:
    """A row of the job whose file has these bytes (`best` and `top_k` of one epoch share one)."""
    stmt = (
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.sha256 == sha256)
        .order_by(Checkpoint.id)
        .limit(1)
    )
    return session.execute(stmt).scalar_one_or_none()


def delete_rows(session: Session, rows: Collection[Checkpoint]) -> None:
    """Delete the rows (their files go after commit: app.retention.unlink_unreferenced)."""
    for row in rows:
        session.delete(row)
    session.flush()


def referenced(session: Session, job_id: str, paths: Collection[str]) -> set[str]:
    """Which of `paths` a row of the job still names."""
    if not paths:
        return set()
    stmt = select(Checkpoint.path).where(
        Checkpoint.job_id == job_id, Checkpoint.path.in_(list(paths))
    )
    return set(session.execute(stmt).scalars())


def all_files(session: Session) -> list[tuple[int, str, str]]:
    """(id, job id, path) of every row, for the start-up sweep."""
    stmt = select(Checkpoint.id, Checkpoint.job_id, Checkpoint.path).order_by(Checkpoint.id)
    return [(row_id, job_id, path) for row_id, job_id, path in session.execute(stmt)]


def jobs_with_several(session: Session) -> list[str]:
    """Jobs with more than one `last`, or ranked checkpoints of more than one epoch: those
    a retention policy may have to prune (the others keep all they have)."""
    lasts = func.sum(case((Checkpoint.kind == "last", 1), else_=0))
    ranked_epochs = func.count(func.distinct(case((Checkpoint.kind != "last", Checkpoint.epoch))))
    stmt = (
        select(Checkpoint.job_id)
        .group_by(Checkpoint.job_id)
        .having((lasts > 1) | (ranked_epochs > 1))
        .order_by(Checkpoint.job_id)
    )
    return list(session.execute(stmt).scalars())
