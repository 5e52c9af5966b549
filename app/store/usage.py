"""What a user holds in the artifact store: their datasets' files and their jobs' disk_bytes."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Dataset, Job


@dataclass(frozen=True)
class Usage:
    datasets: int
    dataset_bytes: int
    jobs: int
    job_bytes: int


def of_user(session: Session, user_id: int) -> Usage:
    datasets, dataset_bytes = session.execute(
        select(func.count(), func.coalesce(func.sum(Dataset.size), 0)).where(
            Dataset.user_id == user_id
        )
    ).one()
    jobs, job_bytes = session.execute(
        select(func.count(), func.coalesce(func.sum(Job.disk_bytes), 0)).where(
            Job.user_id == user_id
        )
    ).one()
    return Usage(int(datasets), int(dataset_bytes), int(jobs), int(job_bytes))
