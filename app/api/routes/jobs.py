"""Jobs: validate, submit, list, read, cancel, metrics history, logs."""

from __future__ import annotations

import base64
import binascii
import functools
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    CurrentUser,
    DispatcherDep,
    OwnedJob,
    SessionDep,
    SettingsDep,
    UserAuth,
    authenticate,
)
from app.api.schemas import (
    MAX_INT64,
    JobOut,
    JobPage,
    JobSummary,
    LogsOut,
    MetricColumnsOut,
    MetricPointOut,
    ValidateOut,
)
from app.async_reads import Coalesced
from app.db import session_scope
from app.errors import BadRequest, NotFound
from app.ids import is_id
from app.store import events, jobs, metric_stream, metrics
from app.submission import check_spec, submit_job

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[UserAuth])
# The hot polls (GET /jobs/{id}, its metrics) authenticate inside the route, skipping
# the dependency machinery (see get_job); they are documented as the others.
shown = APIRouter(prefix="/jobs", tags=["jobs"])
BEARER: dict[str, Any] = {"security": [{"HTTPBearer": []}]}

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
) -> JobOut:
    return JobOut.of(submit_job(session, user.id, body, settings, dispatcher))


@router.get("", response_model=JobPage)
def list_jobs(
    user: CurrentUser,
    session: SessionDep,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobPage:
    page, last = jobs.list_page(
        session, user.id, status=status, limit=limit, before_id=_decode(cursor)
    )
    return JobPage(jobs=[JobSummary.of(job) for job in page], next_cursor=_encode(last))


def _encode(job_id: str | None) -> str | None:
    return base64.urlsafe_b64encode(job_id.encode()).decode().rstrip("=") if job_id else None


def _decode(cursor: str | None) -> str | None:
    if not cursor:
        return None
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        job_id = raw.decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        job_id = ""
    if not is_id(job_id):
        raise BadRequest("cursor: not a cursor this API returned")
    return job_id


@shown.get("/{job_id}", response_model=JobOut, openapi_extra=BEARER)
async def get_job(request: Request, job_id: str) -> Response:
    """What a watcher polls, so it skips the dependency machinery: auth and the
    read are plain calls (the same checks as CurrentUser and OwnedJob), and polls
    made at the same moment share one query and one rendering of each job."""
    user = await authenticate(request)
    if not is_id(job_id):  # '..', a NUL byte: absent, without asking the database
        raise NotFound(f"no job {job_id!r}")
    body = await request.app.state.shown_jobs.get((job_id, user.id))
    if body is None:  # missing, or another user's: the same answer
        raise NotFound(f"no job {job_id!r}")
    return Response(body, media_type="application/json")


def shown_jobs(state: Any) -> Coalesced[tuple[str, int], bytes]:
    """The answers of GET /jobs/{id} by (job id, user id), coalesced (app.async_reads)."""

    async def fetch(keys: list[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
        ids = sorted({job_id for job_id, _ in keys})
        rows = await jobs.shown_by_id(state.async_reads, state.read_engine, ids)
        rendered: dict[str, bytes] = {}
        out = {}
        for job_id, user_id in keys:
            row = rows.get(job_id)
            if row is not None and row.user_id == user_id:
                if job_id not in rendered:
                    rendered[job_id] = JobOut.of(row).model_dump_json().encode()
                out[(job_id, user_id)] = rendered[job_id]
        return out

    return Coalesced(fetch)


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
    same question share one read and one rendering (see `histories`). Without max_points
    the whole history is streamed, encoded as it is read (app/store/metric_stream.py)."""
    user = await authenticate(request)
    if not is_id(job_id):
        raise NotFound(f"no job {job_id!r}")
    wanted = tuple(sorted({n.strip() for n in (names or "").split(",") if n.strip()}))
    if from_step is not None and (since_step is None or from_step - 1 > since_step):
        since_step = from_step - 1
    columnar = shape == "columnar"
    if max_points is None:
        stream = await run_in_threadpool(
            functools.partial(
                metric_stream.open_history,
                request.app.state.read_sessions,
                job_id,
                user.id,
                names=wanted,
                since_step=since_step,
                until_step=until_step,
                columnar=columnar,
            )
        )
        if stream is None:  # missing, or another user's: the same answer
            raise NotFound(f"no job {job_id!r}")
        return StreamingResponse(stream, media_type="application/json")
    key = (job_id, user.id, wanted, since_step, max_points, until_step, columnar)
    body = await request.app.state.histories.get(key)
    if body is None:  # missing, or another user's: the same answer
        raise NotFound(f"no job {job_id!r}")
    return Response(body, media_type="application/json")


HistoryKey = tuple[str, int, tuple[str, ...], int | None, int | None, int | None, bool]
KEPT_HISTORIES = 1_000  # answers an API process keeps (see `histories`)


def histories(state: Any) -> Coalesced[HistoryKey, bytes]:
    """Answers of GET /jobs/{id}/metrics by (job, user, names, since_step, max_points,
    until_step, columnar),
    coalesced (app.async_reads): the reads of a batch in one thread and transaction.

    An answer is kept with the id of the job's latest event when it was read, and
    given again while that id is unchanged (a job's event ids grow in commit order,
    and every metrics report appends one): dashboards polling a job between two of
    its worker's reports share one read. The id is read after the poll arrived, so
    a poll still sees everything committed before it.
    """
    kept: dict[HistoryKey, tuple[int, bytes]] = {}

    def read(keys: list[HistoryKey]) -> dict[HistoryKey, bytes]:
        with session_scope(state.sessions) as session:
            found = jobs.owners(session, sorted({key[0] for key in keys}))
            out = {}
            for key in keys:
                job_id, user_id, names, since_step, max_points, until_step, columnar = key
                owner, version = found.get(job_id, (None, 0))
                if owner != user_id:
                    continue
                hit = kept.get(key)
                if hit is not None and hit[0] == version:
                    out[key] = hit[1]
                    continue
                history = metrics.history(
                    session,
                    job_id,
                    names=names,
                    since_step=since_step,
                    until_step=until_step,
                    max_points=max_points,
                )
                out[key] = orjson.dumps(metrics.columnar(history) if columnar else history)
                if len(kept) >= KEPT_HISTORIES:
                    kept.clear()
                kept[key] = (version, out[key])
            return out

    async def fetch(keys: list[HistoryKey]) -> dict[HistoryKey, bytes]:
        return await run_in_threadpool(read, keys)

    return Coalesced(fetch, in_flight=2)


@router.get("/{job_id}/logs", response_model=LogsOut)
def logs(
    job: OwnedJob,
    session: SessionDep,
    tail: Annotated[
        int | None, Query(ge=1, le=100_000, description="Only the last N lines")
    ] = None,
) -> LogsOut:
    return LogsOut(lines=events.log_lines(session, job.id, tail))
