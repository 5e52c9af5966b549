"""The caller's storage: bytes held by their datasets and jobs."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CurrentUser, SessionDep, UserAuth
from app.api.schemas import UsageOf, UsageOut
from app.store import usage as usage_store

router = APIRouter(tags=["usage"], dependencies=[UserAuth])


@router.get("/usage", response_model=UsageOut)
def usage(user: CurrentUser, session: SessionDep) -> UsageOut:
    """Datasets (file bytes) and jobs (each job's `disk_bytes`) of the caller only."""
    found = usage_store.of_user(session, user.id)
    return UsageOut(
        datasets=UsageOf(count=found.datasets, bytes=found.dataset_bytes),
        jobs=UsageOf(count=found.jobs, bytes=found.job_bytes),
        total_bytes=found.dataset_bytes + found.job_bytes,
    )
