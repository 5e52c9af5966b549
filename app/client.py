"""The CLI's HTTP client for the REST API (`TORCHYARD_URL`, `TORCHYARD_TOKEN`)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from worker.engine.files import atomic_path

RECONNECT_S = 1.0  # before reopening a dropped event stream, unless the server sent `retry:`
GIVE_UP_S = 60.0  # an event stream down this long (no event received) is lost
# The server sends a keepalive comment on a quiet stream every 15 s: a read waiting
# much longer is on a connection that died without a word (a host gone, a NAT reset).
READ_TIMEOUT_S = 60.0


class ApiError(Exception):
    """An API answer a person should read: the status and the server's detail."""

    def __init__(self, status: int, detail: Any):
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {format_detail(detail)}")

    @property
    def lines(self) -> list[str]:
        if isinstance(self.detail, list):
            return [_issue_line(item) for item in self.detail]
        return [format_detail(self.detail)]


def _issue_line(item: Any) -> str:
    if isinstance(item, dict) and "message" in item:
        return f"{item['path']}: {item['message']}" if item.get("path") else str(item["message"])
    return str(item)


def format_detail(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(_issue_line(item) for item in detail)
    return str(detail)


class ApiClient:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0):
        self.url = (url or os.environ.get("TORCHYARD_URL") or "http://127.0.0.1:8000").rstrip("/")
        token = token or os.environ.get("TORCHYARD_TOKEN") or ""
        self.http = httpx.Client(
            base_url=self.url + "/api/v1",
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=timeout,
        )

    def close(self) -> None:
        self.http.close()

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach {self.url}: {exc}") from None
        return _check(response).json() if response.content else None

    def upload(self, path: Path) -> dict[str, Any]:
        with path.open("rb") as handle:
            return self._json("POST", "/datasets", files={"file": (path.name, handle)})

    def validate(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/jobs/validate", json=spec)

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/jobs", json=spec)

    def jobs(self, status: str | None = None, limit: int = 20) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return self._json("GET", "/jobs", params=params)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/jobs/{job_id}/cancel")

    def metrics(
        self, job_id: str, names: list[str] | None = None, max_points: int | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if names:
            params["names"] = ",".join(names)
        if max_points:
            params["max_points"] = max_points
        return self._json("GET", f"/jobs/{job_id}/metrics", params=params)

    def download(self, job_id: str, out: Path, fmt: str | None = None) -> Path:
        params = {"format": fmt} if fmt else {}
        with atomic_path(out) as tmp:
            try:
                with self.http.stream(
                    "GET", f"/jobs/{job_id}/checkpoints/best", params=params, timeout=600
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        _check(response)
                    with tmp.open("wb") as handle:
                        for chunk in response.iter_bytes(1 << 20):
                            handle.write(chunk)
            except httpx.HTTPError as exc:
                raise ApiError(0, f"cannot reach {self.url}: {exc}") from None
        return out

    def events(
        self, job_id: str, last_event_id: str | None = None
    ) -> Iterator[tuple[str, str, Any]]:
        """Yield (id, event, data) from the job's server-sent events until `end`.

        httpx-sse reads the stream (id, event, data, retry as the SSE spec says); it
        does not reconnect, so this does: a dropped or stalled stream is reopened with
        Last-Event-ID, after the server's `retry` (or RECONNECT_S), and no event is
        lost or repeated. A stream down for GIVE_UP_S is an ApiError.
        """
        last_id = last_event_id or ""
        delay = RECONNECT_S
        down_since: float | None = None
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(
                    self.http,
                    "GET",
                    f"/jobs/{job_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(self.http.timeout.connect, read=READ_TIMEOUT_S),
                ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        _check(source.response)
                    for sse in source.iter_sse():
                        if sse.retry is not None:
                            delay = sse.retry / 1000
                        if not sse.data:  # a block with only id or retry: no event
                            continue
                        down_since, last_id = None, sse.id
                        yield sse.id, sse.event, sse.json()
                        if sse.event == "end":
                            return
                problem = "the stream closed before the job's end"
            except SSEError as exc:  # not an event stream at all: retrying will not help
                raise ApiError(0, f"{self.url}: {exc}") from None
            except httpx.TransportError as exc:
                problem = str(exc) or type(exc).__name__
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > GIVE_UP_S:
                raise ApiError(0, f"lost the event stream of job {job_id}: {problem}")
            time.sleep(delay)


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text or response.reason_phrase
    raise ApiError(response.status_code, detail)
