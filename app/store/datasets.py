"""Datasets: uploaded files and their fields; in use while a queued or running job needs them."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.ids import is_id
from app.models import ACTIVE_STATUSES, Dataset, Job, JobDataset


def create(
    session: Session,
    *,
    dataset_id: str,
    user_id: int,
    name: str,
    format: str,
    size: int,
    sha256: str,
    rows: int | None,
    fields: dict[str, Any],
    path: str,
) -> Dataset:
    dataset = Dataset(
        id=dataset_id,
        user_id=user_id,
        name=name,
        format=format,
        size=size,
        sha256=sha256,
        rows=rows,
        fields=fields,
        path=path,
    )
    session.add(dataset)
    session.flush()
    return dataset


def get(session: Session, user_id: int, dataset_id: str) -> Dataset:
    # Not an id at all ('..', a NUL byte): absent, without asking the database.
    dataset = session.get(Dataset, dataset_id) if is_id(dataset_id) else None
    if dataset is None or dataset.user_id != user_id:
        raise NotFound(f"no dataset {dataset_id!r}")
    return dataset


def list_for_user(session: Session, user_id: int, *, sha256: str | None = None) -> list[Dataset]:
    """Newest first; with `sha256`, only the user's datasets of those bytes (never
    another user's: whether someone else holds a file is not this user's to learn)."""
    stmt = select(Dataset).where(Dataset.user_id == user_id)
    if sha256 is not None:
        stmt = stmt.where(Dataset.sha256 == sha256)
    return list(session.execute(stmt.order_by(Dataset.id.desc())).scalars())


def get_many(session: Session, user_id: int, dataset_ids: Collection[str]) -> dict[str, Dataset]:
    """The user's datasets among `dataset_ids`, share-locked so none is deleted under a new job."""
    dataset_ids = [d for d in dataset_ids if is_id(d)]
    if not dataset_ids:
        return {}
    stmt = (
        select(Dataset)
        .where(Dataset.id.in_(dataset_ids), Dataset.user_id == user_id)
        .with_for_update(read=True)
    )
    return {d.id: d for d in session.execute(stmt).scalars()}


def delete_unused(session: Session, user_id: int, dataset_id: str) -> Dataset:
    """Delete the row (the caller removes the file after commit); 409 while a job needs it."""
    if not is_id(dataset_id):
        raise NotFound(f"no dataset {dataset_id!r}")
    stmt = (
        select(Dataset)
        .where(Dataset.id == dataset_id, Dataset.user_id == user_id)
        .with_for_update()
    )
    dataset = session.execute(stmt).scalar_one_or_none()
    if dataset is None:
        raise NotFound(f"no dataset {dataset_id!r}")
    users = session.execute(
        select(Job.id)
        .join(JobDataset, JobDataset.job_id == Job.id)
        .where(JobDataset.dataset_id == dataset_id, Job.status.in_(ACTIVE_STATUSES))
        .order_by(Job.id)
    ).scalars()
    in_use = list(users)
    if in_use:
        raise Conflict(f"dataset {dataset_id!r} is used by active job(s): {', '.join(in_use)}")
    session.execute(delete(Dataset).where(Dataset.id == dataset_id))
    return dataset


def for_job(session: Session, job_id: str, dataset_id: str) -> Dataset:
    """A dataset a job was submitted with (what its worker may download)."""
    if not is_id(dataset_id):
        raise NotFound(f"no dataset {dataset_id!r} for this job")
    stmt = (
        select(Dataset)
        .join(JobDataset, JobDataset.dataset_id == Dataset.id)
        .where(JobDataset.job_id == job_id, Dataset.id == dataset_id)
    )
    dataset = session.execute(stmt).scalar_one_or_none()
    if dataset is None:
        raise NotFound(f"no dataset {dataset_id!r} for this job")
    return dataset


def of_job(session: Session, job_id: str) -> list[Dataset]:
    stmt = (
        select(Dataset)
        .join(JobDataset, JobDataset.dataset_id == Dataset.id)
        .where(JobDataset.job_id == job_id)
    )
    return list(session.execute(stmt).scalars())


def all_ids(session: Session) -> set[str]:
    return set(session.execute(select(Dataset.id)).scalars())


def unreferenced(session: Session, created_before: datetime) -> list[Dataset]:
    """Datasets no job names, uploaded before `created_before` (oldest first)."""
    named = exists().where(JobDataset.dataset_id == Dataset.id)
    stmt = (
        select(Dataset)
        .where(~named, Dataset.created_at < created_before)
        .order_by(Dataset.created_at, Dataset.id)
    )
    return list(session.execute(stmt).scalars())


def delete_if_unreferenced(session: Session, dataset_id: str) -> bool:
    """Delete the row if still no job names it (the caller removes the file after commit).

    The row lock conflicts with the share lock a submission takes on its datasets
    (`get_many`): a job submitted meanwhile is seen here, or its submission finds the
    dataset gone (404), never a job without its data.
    """
    stmt = select(Dataset.id).where(Dataset.id == dataset_id).with_for_update()
    if session.execute(stmt).scalar_one_or_none() is None:
        return False
    named = session.execute(
        select(func.count()).select_from(JobDataset).where(JobDataset.dataset_id == dataset_id)
    ).scalar_one()
    if named:
        return False
    session.execute(delete(Dataset).where(Dataset.id == dataset_id))
    return True
