"""Handles on a job: `Job` for the sync `Client`, `AsyncJob` for the `AsyncClient`.

A handle keeps the latest answer about its job in `info` (GET /jobs/{id}, or the
summary a listing gave); `refresh()` reads it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchyard.events import Event
from torchyard.metrics import Metrics

if TYPE_CHECKING:
    from torchyard.aio import AsyncClient
    from torchyard.client import Client

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
POLL_S = 1.0  # how often wait() reads a job


def _pause(job_id: str, deadline: float | None, poll_s: float) -> float:
    """How long a wait sleeps before its next read; TimeoutError once its time is up."""
    if deadline is None:
        return poll_s
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"job {job_id} did not end in time")
    return min(poll_s, left)


def metric_params(
    names: Iterable[str] | None, max_points: int | None, since_step: int | None
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if names:
        params["names"] = ",".join(names)
    if max_points:
        params["max_points"] = max_points
    if since_step is not None:
        params["since_step"] = since_step
    return params


def update_body(tags: Iterable[str] | None, note: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if tags is not None:
        body["tags"] = list(tags)
    if note is not None:
        body["note"] = note
    return body


class _Handle:
    def __init__(self, info: dict[str, Any]):
        self.id: str = info["id"]
        self.info = info

    @property
    def status(self) -> str:
        """queued, running, succeeded, failed or cancelled, as last read."""
        return str(self.info["status"])

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.status}>"

    def _took(self, answer: Any) -> Any:
        """Keep an answer that is this job (self); None when the answer was something else."""
        if isinstance(answer, dict) and answer.get("id") == self.id:
            self.info = answer
            return self
        return None

    def _default_out(self, format: str | None) -> Path:
        return Path(f"{self.id}.{format or 'safetensors'}")


class Job(_Handle):
    """A job on the service (see `Client.submit`, `Client.job`, `Client.jobs`)."""

    def __init__(self, client: Client, info: dict[str, Any]):
        super().__init__(info)
        self._client = client

    def refresh(self) -> Job:
        """Read the job again: status, progress, latest and best metrics."""
        self.info = self._client._call("GET", f"/jobs/{self.id}")
        return self

    def follow(self, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's events (`status`, `metrics`, `log`, `checkpoint`) as they happen, until
        `end`; a dropped stream is reopened with Last-Event-ID, losing and repeating nothing.
        From the start, or after `last_event_id`."""
        return self._client._follow(self.id, last_event_id)

    def wait(self, timeout: float | None = None, *, poll_s: float = POLL_S) -> Job:
        """Block until the job ends; returns it, read at its end.

        It polls GET /jobs/{id} (the service's read for watchers) every `poll_s`; raises
        TimeoutError when `timeout` seconds pass first. A failed or cancelled job is not
        an error here: look at `status` and `info["error"]`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.refresh().done:
            time.sleep(_pause(self.id, deadline, poll_s))
        return self

    def metrics(
        self,
        names: Iterable[str] | None = None,
        max_points: int | None = None,
        *,
        since_step: int | None = None,
    ) -> Metrics:
        """Metric history, {name: [{step, epoch, value, time}]} (`.to_pandas()` for a frame);
        `max_points` downsamples each series on the server."""
        params = metric_params(names, max_points, since_step)
        return Metrics(self._client._call("GET", f"/jobs/{self.id}/metrics", params=params))

    def logs(self, tail: int | None = None) -> list[str]:
        params = {"tail": tail} if tail else {}
        return self._client._call("GET", f"/jobs/{self.id}/logs", params=params)["lines"]

    def checkpoints(self) -> list[dict[str, Any]]:
        return self._client._call("GET", f"/jobs/{self.id}/checkpoints")

    def download(
        self, out: str | Path | None = None, *, format: str | None = None, checkpoint: str = "best"
    ) -> Path:
        """Save the best weights (safetensors), or the model exported (`format`: pt2, onnx).

        `checkpoint`: "best" or a checkpoint id from `checkpoints()`. The file appears
        whole or not at all. Default name: `<job id>.<format>`.
        """
        target = Path(out) if out is not None else self._default_out(format)
        return self._client._download(self.id, checkpoint, target, format)

    def cancel(self) -> Job:
        """Queued: cancelled at once. Running: stops within a heartbeat; its best checkpoint stays."""
        self.info = self._client._call("POST", f"/jobs/{self.id}/cancel")
        return self

    def update(self, *, tags: Iterable[str] | None = None, note: str | None = None) -> Job:
        """Replace the job's tags and/or note (PATCH /jobs/{id})."""
        answer = self._client._call("PATCH", f"/jobs/{self.id}", json=update_body(tags, note))
        return self._took(answer) or self.refresh()

    def delete(self) -> None:
        """Delete a finished job with its metrics and checkpoints (409 while it runs)."""
        self._client._call("DELETE", f"/jobs/{self.id}")


class AsyncJob(_Handle):
    """A job on the service, for asyncio code (see `AsyncClient`); the methods of `Job`."""

    def __init__(self, client: AsyncClient, info: dict[str, Any]):
        super().__init__(info)
        self._client = client

    async def refresh(self) -> AsyncJob:
        self.info = await self._client._call("GET", f"/jobs/{self.id}")
        return self

    def follow(self, last_event_id: str | None = None) -> AsyncIterator[Event]:
        return self._client._follow(self.id, last_event_id)

    async def wait(self, timeout: float | None = None, *, poll_s: float = POLL_S) -> AsyncJob:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (await self.refresh()).done:
            await asyncio.sleep(_pause(self.id, deadline, poll_s))
        return self

    async def metrics(
        self,
        names: Iterable[str] | None = None,
        max_points: int | None = None,
        *,
        since_step: int | None = None,
    ) -> Metrics:
        params = metric_params(names, max_points, since_step)
        return Metrics(await self._client._call("GET", f"/jobs/{self.id}/metrics", params=params))

    async def logs(self, tail: int | None = None) -> list[str]:
        params = {"tail": tail} if tail else {}
        return (await self._client._call("GET", f"/jobs/{self.id}/logs", params=params))["lines"]

    async def checkpoints(self) -> list[dict[str, Any]]:
        return await self._client._call("GET", f"/jobs/{self.id}/checkpoints")

    async def download(
        self, out: str | Path | None = None, *, format: str | None = None, checkpoint: str = "best"
    ) -> Path:
        target = Path(out) if out is not None else self._default_out(format)
        return await self._client._download(self.id, checkpoint, target, format)

    async def cancel(self) -> AsyncJob:
        self.info = await self._client._call("POST", f"/jobs/{self.id}/cancel")
        return self

    async def update(
        self, *, tags: Iterable[str] | None = None, note: str | None = None
    ) -> AsyncJob:
        answer = await self._client._call("PATCH", f"/jobs/{self.id}", json=update_body(tags, note))
        return self._took(answer) or await self.refresh()

    async def delete(self) -> None:
        await self._client._call("DELETE", f"/jobs/{self.id}")
