"""Server-sent events of a job, resumable with Last-Event-ID."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from app.api.deps import OwnedJob, UserAuth
from app.api.schemas import MAX_INT64
from app.event_stream import sse_frames

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[UserAuth])

STREAM = {200: {"content": {"text/event-stream": {}}, "description": "id, event, data per event"}}
# no-cache: every watcher reads live; X-Accel-Buffering: nginx must not hold events back
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get("/{job_id}/events", response_class=StreamingResponse, responses=STREAM)
def job_events(
    request: Request,
    job: OwnedJob,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_INT64, description="Like Last-Event-ID, for clients that cannot set it"),
    ] = None,
) -> StreamingResponse:
    """`status`, `metrics`, `checkpoint`, `log` events as stored; `end` after a terminal status."""
    if not after and last_event_id and last_event_id.isdigit():
        # no event id is larger than the column holds: a larger one means "after all of them"
        after = min(int(last_event_id), MAX_INT64)
    start = after or 0
    return StreamingResponse(
        sse_frames(request.app.state.event_polls, job.id, start),
        media_type="text/event-stream",
        headers=STREAM_HEADERS,
    )
