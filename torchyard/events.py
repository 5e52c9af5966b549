"""A job's server-sent events, followed across dropped connections.

httpx-sse reads the stream (id, event, data, retry as the SSE spec says); it does
not reconnect, so the clients do, with the state kept here: a dropped or stalled
stream is reopened with Last-Event-ID after the server's `retry` (or RECONNECT_S),
and no event is lost or repeated. A stream down for GIVE_UP_S is `Unreachable`.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from httpx_sse import ServerSentEvent

from torchyard.errors import Unreachable

RECONNECT_S = 1.0  # before reopening a dropped event stream, unless the server sent `retry:`
GIVE_UP_S = 60.0  # an event stream down this long (no event received) is lost
# The server sends a keepalive comment on a quiet stream every 15 s: a read waiting
# much longer is on a connection that died without a word (a host gone, a NAT reset).
READ_TIMEOUT_S = 60.0


class Event(NamedTuple):
    """One event of a job: `status`, `metrics`, `log`, `checkpoint`, then `end`."""

    id: str
    event: str
    data: Any


class Followed:
    """Where a followed stream is between its connections (the sync and async clients share it)."""

    def __init__(self, job_id: str, last_event_id: str | None):
        self.job_id = job_id
        self.last_id = last_event_id or ""
        self._delay = RECONNECT_S
        self._down_since: float | None = None

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": self.last_id} if self.last_id else {}

    def seen(self, sse: ServerSentEvent) -> Event | None:
        """The event a block of the stream carries; None for a block with only id or retry."""
        if sse.retry is not None:
            self._delay = sse.retry / 1000
        if not sse.data:
            return None
        self._down_since, self.last_id = None, sse.id
        return Event(sse.id, sse.event, sse.json())

    def dropped(self, problem: str) -> float:
        """Seconds to wait before reopening; raises once the stream has been down too long."""
        now = time.monotonic()
        self._down_since = self._down_since or now
        if now - self._down_since > GIVE_UP_S:
            raise Unreachable(f"lost the event stream of job {self.job_id}: {problem}")
        return self._delay
