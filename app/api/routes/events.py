"""Server-sent events of a job, resumable with Last-Event-ID."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from app.api.deps import authenticate, read_models
from app.api.schemas import MAX_INT64
from app.errors import NotFound
from app.event_stream import sse_frames

router = APIRouter(prefix="/jobs", tags=["jobs"])

STREAM = {200: {"content": {"text/event-stream": {}}, "description": "id, event, data per event"}}
# no-cache: every watcher reads live; X-Accel-Buffering: nginx must not hold events back
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses=STREAM,
    openapi_extra={"security": [{"HTTPBearer": []}]},
)
async def job_events(
    request: Request,
    job_id: str,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_INT64, description="Like Last-Event-ID, for clients that cannot set it"),
    ] = None,
) -> StreamingResponse:
    """`status`, `metrics`, `checkpoint`, `log` events as stored; `end` after a terminal status.

    Browsers open streams in bursts (a dashboard's page load): the auth and the
    ownership check are plain calls on the event loop, the check shared with GET
    /jobs/{id}'s coalesced reads, so a burst does not queue for the thread pool."""
    user = await authenticate(request)
    reads = read_models(request)
    # missing, or another user's: the same answer
    if await reads.jobs.get(job_id, user.id) is None:
        raise NotFound(f"no job {job_id!r}")
    if not after and last_event_id and last_event_id.isdigit():
        # no event id is larger than the column holds: a larger one means "after all of them"
        after = min(int(last_event_id), MAX_INT64)
    start = after or 0
    return StreamingResponse(
        sse_frames(reads.events, job_id, start),
        media_type="text/event-stream",
        headers=STREAM_HEADERS,
    )
