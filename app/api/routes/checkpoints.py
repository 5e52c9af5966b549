"""Checkpoints of a job: list, download (ETag, Range), export on the fly."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response

from app import retention
from app.api.deps import ArtifactsDep, OwnedJob, SessionDep, SessionsDep, UserAuth
from app.api.files import checkpoint_response
from app.api.schemas import MAX_INT32, CheckpointOut
from app.artifacts import ArtifactStore
from app.db import Sessions, session_scope
from app.exports import ExportFormat
from app.models import Checkpoint, Job
from app.store import checkpoints

router = APIRouter(prefix="/jobs", tags=["checkpoints"], dependencies=[UserAuth])

FormatQuery = Annotated[
    ExportFormat | None,
    Query(
        alias="format",
        description="pt2 (torch.export) or onnx: export the weights; default: the file as stored",
    ),
]
DOWNLOAD: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "The file"}
}


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointOut])
def list_checkpoints(job: OwnedJob, session: SessionDep) -> list[CheckpointOut]:
    return [CheckpointOut.of(c) for c in checkpoints.list_for_job(session, job.id)]


# The lookups run in their own short transaction: an export can take a while.
@router.get("/{job_id}/checkpoints/best", response_class=Response, responses=DOWNLOAD)
def download_best(
    request: Request,
    job: OwnedJob,
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
    fmt: FormatQuery = None,
) -> Response:
    with session_scope(sessions) as session:
        checkpoint = retention.best(session, job)
    return _answer(request, sessions, artifacts, job, checkpoint, fmt)


@router.get("/{job_id}/checkpoints/{checkpoint_id}", response_class=Response, responses=DOWNLOAD)
def download(
    request: Request,
    job: OwnedJob,
    checkpoint_id: Annotated[int, Path(ge=1, le=MAX_INT32)],
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
    fmt: FormatQuery = None,
) -> Response:
    with session_scope(sessions) as session:
        checkpoint = checkpoints.get(session, job.id, checkpoint_id)
    return _answer(request, sessions, artifacts, job, checkpoint, fmt)


def _answer(
    request: Request,
    sessions: Sessions,
    artifacts: ArtifactStore,
    job: Job,
    checkpoint: Checkpoint,
    fmt: ExportFormat | None,
) -> Response:
    response = checkpoint_response(request, artifacts, job, checkpoint, fmt)
    if fmt is not None:  # an export may have been cached beside the weights: the job grew
        retention.refresh_disk_bytes(sessions, artifacts, job.id)
    return response
