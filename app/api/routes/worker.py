"""The worker protocol (docs/service.md): claim with the worker token, report with the attempt's."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    ArtifactsDep,
    AttemptAuth,
    DispatcherDep,
    ReleasingAttempt,
    SessionDep,
    SessionsDep,
    SettingsDep,
    WorkerAttempt,
    WorkerAuth,
    bearer_token,
)
from app.api.files import file_response
from app.api.schemas import (
    MAX_INT32,
    MAX_INT64,
    CancelOut,
    CheckpointOut,
    ClaimIn,
    ClaimOut,
    FinishIn,
    GangOut,
    HeartbeatIn,
    JobOut,
    LogsIn,
    MetricsIn,
    MetricsOut,
    ReleaseIn,
    json_body,
)
from app.db import Sessions, session_scope
from app.errors import BadRequest
from app.protocol import (
    claim_job,
    receive_checkpoint,
    record_logs,
    record_metrics,
    release_attempt,
)
from app.store import attempts, checkpoints, datasets, gangs

claims = APIRouter(prefix="/worker", tags=["worker"], dependencies=[WorkerAuth])
router = APIRouter(prefix="/worker", tags=["worker"], dependencies=[AttemptAuth])
# Release authenticates on its own: a retry comes from an attempt no longer current.
releases = APIRouter(prefix="/worker", tags=["worker"])

DOWNLOAD: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "The file"}
}
SHA256_HEX = 64


@claims.post("/jobs/{job_id}/claim", response_model=ClaimOut)
def claim(job_id: str, body: ClaimIn, session: SessionDep, settings: SettingsDep) -> ClaimOut:
    """Move `queued -> running` and start an attempt; 409 when the job is not queued."""
    return ClaimOut.model_validate(
        claim_job(session, job_id, body.worker, settings, body.host, body.port)
    )


@releases.post("/jobs/{job_id}/gang", response_model=GangOut)
def gang(request: Request, job_id: str, session: SessionDep, settings: SettingsDep) -> GangOut:
    """A gang member's place (its member token): gathering, whole (rank, endpoint) or gone."""
    answer = gangs.state(session, job_id, bearer_token(request), wait_s=settings.gang_wait_s)
    if answer["state"] == "whole" and checkpoints.exists(session, job_id, "last"):
        answer["resume"] = {"url": f"/api/v1/worker/jobs/{job_id}/resume"}
    return GangOut.model_validate(answer)


@router.get("/datasets/{dataset_id}", response_class=Response, responses=DOWNLOAD)
def dataset_file(
    request: Request,
    dataset_id: str,
    ref: WorkerAttempt,
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
) -> Response:
    with session_scope(sessions) as session:
        dataset = datasets.for_job(session, ref.job_id, dataset_id)
    return file_response(
        request, artifacts.path(dataset.path), etag=dataset.sha256, filename=dataset.name
    )


@router.get("/jobs/{job_id}/resume", response_class=Response, responses=DOWNLOAD)
def resume_state(
    request: Request, ref: WorkerAttempt, sessions: SessionsDep, artifacts: ArtifactsDep
) -> Response:
    """The job's latest `last.pt` (training state), 404 if none."""
    with session_scope(sessions) as session:
        state = checkpoints.newest(session, ref.job_id, "last")
    return file_response(request, artifacts.path(state.path), etag=state.sha256, filename="last.pt")


@router.post("/jobs/{job_id}/heartbeat", response_model=CancelOut)
def heartbeat(
    body: HeartbeatIn, ref: WorkerAttempt, session: SessionDep, settings: SettingsDep
) -> CancelOut:
    progress = body.progress.model_dump(exclude_none=True)
    return CancelOut(cancel=attempts.heartbeat(session, ref, progress, settings.lease_s))


# The metrics report, a worker's most frequent call, authenticates itself (as GET
# /jobs/{id} does): the token's check is the statement that locks the job, all in one
# thread hop and one transaction (see post_metrics).
reports = APIRouter(prefix="/worker", tags=["worker"])


@reports.post(
    "/jobs/{job_id}/metrics",
    response_model=MetricsOut,
    openapi_extra={**json_body(MetricsIn), "security": [{"HTTPBearer": []}]},
)
async def post_metrics(request: Request, job_id: str) -> Response:
    """Idempotent: points are keyed by (job, name, step). Also a heartbeat."""
    token = bearer_token(request)
    body = await request.body()
    state = request.app.state
    answer = await run_in_threadpool(
        _record_metrics, state.sessions, token, job_id, body, state.settings.lease_s
    )
    return Response(answer, media_type="application/json")


def _record_metrics(
    sessions: Sessions, token: str, job_id: str, body: bytes, lease_s: float
) -> bytes:
    """What the dependencies of the other reports do (auth, a session), done by hand:
    solving them cost a 1,000-point batch three thread hops and a transaction of its
    own for the token, more than its points took to store."""
    with session_scope(sessions) as session:
        job = attempts.lock_by_token(session, token, job_id)  # 401, 404, 409 before 422
        points = _parse_metrics(body)
        inserted, cancel = record_metrics(session, job, points, lease_s)
    return MetricsOut(inserted=inserted, cancel=cancel).model_dump_json().encode()


def _parse_metrics(body: bytes) -> list[dict[str, Any]]:
    """The body parsed and checked in one pass by pydantic (its JSON parser): for a batch of
    thousands of points, a third of what json.loads and then validation take."""
    try:
        return list(MetricsIn.model_validate_json(body).points)  # type: ignore[arg-type]
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


@router.put(
    "/jobs/{job_id}/checkpoints/{kind}/{epoch}", status_code=201, response_model=CheckpointOut
)
async def put_checkpoint(
    request: Request,
    kind: Literal["best", "last", "top_k"],
    epoch: Annotated[int, Path(ge=0, le=MAX_INT32)],
    ref: WorkerAttempt,
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
    settings: SettingsDep,
    x_sha256: Annotated[str, Header(description="sha256 hex of the body")],
    x_step: Annotated[int, Header(ge=0, le=MAX_INT64)] = 0,
    x_monitor: Annotated[str | None, Header(max_length=128)] = None,
    x_value: Annotated[float | None, Header()] = None,
) -> CheckpointOut:
    """Raw bytes checked against X-Sha256 (400 on mismatch); idempotent by (job, epoch, kind)."""
    if len(x_sha256) != SHA256_HEX or any(c not in "0123456789abcdefABCDEF" for c in x_sha256):
        raise BadRequest("X-Sha256 must be 64 hex digits")
    checkpoint = await receive_checkpoint(
        sessions,
        artifacts,
        ref,
        request.stream(),
        sha256=x_sha256,
        kind=kind,
        epoch=epoch,
        step=x_step,
        monitor=x_monitor,
        value=x_value,
        lease_s=settings.lease_s,
    )
    return CheckpointOut.of(checkpoint)


@router.post("/jobs/{job_id}/logs", status_code=204)
def post_logs(
    body: LogsIn, ref: WorkerAttempt, session: SessionDep, settings: SettingsDep
) -> Response:
    record_logs(session, ref, body.lines, settings.lease_s)
    return Response(status_code=204)


@router.post("/jobs/{job_id}/finish", response_model=JobOut)
def finish(body: FinishIn, ref: WorkerAttempt, session: SessionDep) -> JobOut:
    """Set the terminal state, best epoch and value, early stop and error from the RunResult."""
    return JobOut.of(attempts.finish(session, ref, body.status, body.result.model_dump()))


@releases.post("/jobs/{job_id}/release", response_model=JobOut)
def release(
    body: ReleaseIn, ref: ReleasingAttempt, session: SessionDep, dispatcher: DispatcherDep
) -> JobOut:
    """The worker is stopping: `running -> queued` now (attempt + 1 at the next claim), and a
    wake-up is sent, so the job resumes from its last checkpoint without waiting for the
    lease to expire. Idempotent for the attempt; 409 `stale attempt` when another owns the job.

    `lost: true`: the attempt was lost (a rank or node of a data-parallel run died), as
    when a worker's lease runs out: a restart, counted against `max_restarts`."""
    return JobOut.of(release_attempt(session, dispatcher, ref, body.reason, lost=body.lost))
