"""Server-sent events of a job, resumable with Last-Event-ID."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from app.api.deps import authenticate, read_models
from app.api.schemas import MAX_INT64
from app.errors import NotFound
from app.event_stream import sse_frames

router = APIRouter(prefix="/jobs", tags=["jobs"])

STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "id, event, data per event"}
}
# no-cache: every watcher reads live; X-Accel-Buffering: nginx must not hold events back
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def resume_after(last_event_id: str | None) -> int | None:
    """The event id a `Last-Event-ID` header names; None when absent or empty.

    Our ids are decimal integers; anything else (a sign, a word, non-ASCII digits
    such as "١٢") is a 422 at `header.Last-Event-ID`. An empty value is no id, as in
    the SSE spec. No event id is larger than the column holds, so a larger one (of
    any length: it is never handed to int()) means "after all of them".
    """
    if not last_event_id:
        return None
    if not (last_event_id.isascii() and last_event_id.isdigit()):
        shown = last_event_id if len(last_event_id) <= 40 else last_event_id[:40] + "..."
        raise RequestValidationError(
            [
                {
                    "type": "int_parsing",
                    "loc": ("header", "Last-Event-ID"),
                    "msg": f"an event id is a number of digits 0-9, found {shown!r}",
                }
            ]
        )
    digits = last_event_id.lstrip("0")
    if len(digits) > len(str(MAX_INT64)):
        return MAX_INT64
    return min(int(digits or "0"), MAX_INT64)


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
    metrics_after: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_INT64,
            description="Skip metrics events up to this id: the X-Last-Event-Id of a "
            "GET /jobs/{id}/metrics answer already read (the other events still come from the start)",
        ),
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
    resume = resume_after(last_event_id)
    start = after or resume or 0
    return StreamingResponse(
        sse_frames(reads.events, job_id, start, metrics_after or 0),
        media_type="text/event-stream",
        headers=STREAM_HEADERS,
    )
