"""Jobs: validate, submit, list, read, edit, delete, cancel, metrics history, logs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.api import job_cursor
from app.api.deps import (
    ArtifactsDep,
    CurrentUser,
    DispatcherDep,
    OwnedJob,
    ReadSessionDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
    UserAuth,
    authenticate,
    read_models,
)
from app.api.schemas import (
    MAX_INT64,
    JobEdit,
    JobOut,
    JobPage,
    JobSummary,
    LogsOut,
    MetricColumnsOut,
    MetricPointOut,
    ValidateOut,
)
from app.errors import NotFound
from app.job_deletion import delete_job
from app.store import events, jobs
from app.store.jobs import Sort
from app.submission import MAX_SOURCE_CHARS, SOURCES_HEADER, check_spec, submit_job
from worker.engine.spec import MAX_TAGS, Label

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[UserAuth])
# The hot polls (GET /jobs/{id}, its metrics) authenticate inside the route, skipping
# the dependency machinery (see get_job); they are documented as the others.
shown = APIRouter(prefix="/jobs", tags=["jobs"])
BEARER: dict[str, Any] = {"security": [{"HTTPBearer": []}]}
LAST_EVENT = "X-Last-Event-Id"

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]

SPEC_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "A job spec (`torchyard schema` prints its JSON Schema)",
                }
            }
        },
    }
}


async def _spec_body(request: Request) -> bytes:
    return await request.body()


SpecBody = Annotated[bytes, Depends(_spec_body)]


@router.post("/validate", response_model=ValidateOut, openapi_extra=SPEC_BODY)
def validate(
    body: SpecBody, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> ValidateOut:
    """Check a spec against your datasets and build it on the meta device (nothing is allocated)."""
    return ValidateOut(summary=check_spec(session, user.id, body, settings).summary)


@router.post("", status_code=201, response_model=JobOut, openapi_extra=SPEC_BODY)
def submit(
    body: SpecBody,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    sources: Annotated[
        str | None,
        Header(
            alias=SOURCES_HEADER,
            max_length=4 * MAX_SOURCE_CHARS,
            description="Where the datasets came from, for the record: JSON "
            '{"data.train": "local/path.npz"}, keyed by the JSON path of each dataset id',
        ),
    ] = None,
) -> JobOut:
    return JobOut.of(submit_job(session, user.id, body, settings, dispatcher, sources=sources))


@router.get("", response_model=JobPage)
def list_jobs(
    user: CurrentUser,
    session: ReadSessionDep,
    project: Annotated[Label | None, Query(description="Only this project's jobs")] = None,
    tag: Annotated[
        list[Label] | None,
        Query(max_length=MAX_TAGS, description="Jobs with this tag; repeated, with all of them"),
    ] = None,
    status: Status | None = None,
    name: Annotated[
        str | None,
        Query(min_length=1, max_length=200, description="A substring of the name, any case"),
    ] = None,
    sort: Annotated[
        Sort, Query(description="created: by submission; best: by best monitored value")
    ] = "created",
    order: Annotated[
        Literal["desc", "asc"] | None,
        Query(description="Default: desc for created (newest first), asc for best (lowest first)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobPage:
    """Your jobs, filtered (filters combine with AND) and sorted, a page at a time."""
    descending = (order or ("desc" if sort == "created" else "asc")) == "desc"
    query = jobs.JobQuery(
        project=project,
        tags=tuple(tag or ()),
        status=status,
        name=name,
        sort=sort,
        descending=descending,
    )
    after = job_cursor.decode(cursor, sort, descending)
    page, last = jobs.search(session, user.id, query, limit=limit, after=after)
    return JobPage(
        jobs=[JobSummary.of(job) for job in page],
        next_cursor=job_cursor.encode(last, sort, descending),
    )


@shown.get("/{job_id}", response_model=JobOut, openapi_extra=BEARER)
async def get_job(request: Request, job_id: str) -> Response:
    """What a watcher polls, so it skips the dependency machinery: auth and the
    read are plain calls (the same checks as CurrentUser and OwnedJob), and polls
    made at the same moment share one query and one rendering of each job."""
    user = await authenticate(request)
    body = await read_models(request).jobs.get(job_id, user.id)
    if body is None:  # missing, or another user's: the same answer
        raise NotFound(f"no job {job_id!r}")
    return Response(body, media_type="application/json")


@router.patch("/{job_id}", response_model=JobOut)
def edit(job_id: str, body: JobEdit, user: CurrentUser, session: SessionDep) -> JobOut:
    """Change a job's project, tags or note, in any state (keys left out are kept)."""
    changes = body.model_dump(exclude_none=True)
    return JobOut.of(jobs.edit(session, user.id, job_id, **changes))


@router.delete("/{job_id}", status_code=204)
def delete(
    job_id: str, user: CurrentUser, sessions: SessionsDep, artifacts: ArtifactsDep
) -> Response:
    """Delete a finished job with its metrics, events, logs and files (409 while it is
    queued or running: cancel it first)."""
    delete_job(sessions, artifacts, user.id, job_id)
    return Response(status_code=204)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel(job_id: str, user: CurrentUser, session: SessionDep) -> JobOut:
    """Queued: cancelled at once. Running: the worker is told to stop at its next report."""
    return JobOut.of(jobs.cancel(session, user.id, job_id))


@shown.get(
    "/{job_id}/metrics",
    response_model=dict[str, list[MetricPointOut]] | dict[str, MetricColumnsOut],
    openapi_extra=BEARER,
)
async def metric_history(
    request: Request,
    job_id: str,
    names: Annotated[
        str | None, Query(description="Comma-separated metric names; all when absent")
    ] = None,
    since_step: Annotated[
        int | None, Query(ge=-1, le=MAX_INT64, description="Only points with step > since_step")
    ] = None,
    max_points: Annotated[
        int | None,
        Query(ge=4, le=100_000, description="Downsample each series to at most this many points"),
    ] = None,
    from_step: Annotated[
        int | None, Query(ge=0, le=MAX_INT64, description="Only points with step >= from_step")
    ] = None,
    until_step: Annotated[
        int | None, Query(ge=0, le=MAX_INT64, description="Only points with step <= until_step")
    ] = None,
    shape: Annotated[
        Literal["points", "columnar"],
        Query(
            alias="format",
            description="points: {name: [{step, epoch, value, time}]}; "
            "columnar: {name: {step: [...], epoch: [...], value: [...], time: [...]}}",
        ),
    ] = "points",
) -> Response:
    """What a dashboard polls, with GET /jobs/{id}: reads made at the same moment with the
    same question share one read and one rendering. Without max_points the whole
    history is streamed, encoded as it is read. With max_points the answer's
    `X-Last-Event-Id` header is the id of the job's latest event when it was read: the
    events after it (GET /jobs/{id}/events?after=...) carry what it may lack."""
    user = await authenticate(request)
    if from_step is not None and (since_step is None or from_step - 1 > since_step):
        since_step = from_step - 1  # from_step is inclusive, since_step exclusive
    histories = read_models(request).histories
    columnar = shape == "columnar"
    if max_points is None:
        stream = await histories.stream(
            job_id,
            user.id,
            names=names,
            since_step=since_step,
            until_step=until_step,
            columnar=columnar,
        )
        if stream is None:  # missing, or another user's: the same answer
            raise NotFound(f"no job {job_id!r}")
        return StreamingResponse(stream, media_type="application/json")
    read = await histories.get(
        job_id,
        user.id,
        names=names,
        since_step=since_step,
        until_step=until_step,
        max_points=max_points,
        columnar=columnar,
    )
    if read is None:  # missing, or another user's: the same answer
        raise NotFound(f"no job {job_id!r}")
    event_id, body = read
    # where a watcher picks up GET /jobs/{id}/events?after=<it> (the dashboard's charts)
    return Response(body, media_type="application/json", headers={LAST_EVENT: str(event_id)})


@router.get("/{job_id}/logs", response_model=LogsOut)
def logs(
    job: OwnedJob,
    session: SessionDep,
    tail: Annotated[
        int | None, Query(ge=1, le=100_000, description="Only the last N lines")
    ] = None,
) -> LogsOut:
    return LogsOut(lines=events.log_lines(session, job.id, tail))
