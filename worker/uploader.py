"""The worker parent's side of a training child's reports: the `Uploader`.

It sends what the child puts on its queue (`worker/reporting.py`) to the API in
order, batching metrics, heartbeating, and, while the API is unreachable,
buffering (bounded in memory, spilling to disk) so training never waits on the
network and nothing is lost. It imports no torch: the worker parent stays light
(the child imports torch when it trains).
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import time
from collections import deque
from pathlib import Path
from typing import Any

from worker.client import ApiUnavailable, StaleAttempt, WorkerClient
from worker.engine.files import atomic_write_text

log = logging.getLogger("torchyard.worker")

METRICS_BATCH = 5_000
# A partial metrics batch waits this long for more points before it is sent: the
# reports of several log steps go as one request, one event for SSE watchers and one
# new version of the job's history for the API's caches, at the cost of live charts
# lagging by about this much (the API's SSE tick is 0.25 s).
METRICS_HOLD_S = 0.5


class Uploader:
    """The parent's side: delivers the child's reports in order, whatever the API does."""

    def __init__(
        self,
        client: WorkerClient,
        job_id: str,
        inbox: Any,
        cancel: Any,
        *,
        spill_dir: Path,
        lease_s: float,
        buffer_points: int = 100_000,
        hold_s: float = METRICS_HOLD_S,
    ):
        self.client = client
        self.job_id = job_id
        self.inbox = inbox
        self.cancel = cancel
        self.spill_dir = spill_dir
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_every = max(0.5, lease_s / 3)
        self.buffer_points = buffer_points
        self.hold_s = hold_s
        self._batch_started = 0.0  # when the last pending metrics batch got its first points
        self.pending: deque[tuple[str, Any]] = deque()
        self.points_in_memory = 0
        self.progress: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.stale = False
        self._last_heartbeat = 0.0
        self._progress_sent: dict[str, Any] = {}
        self._retry_at = 0.0
        self._backoff = 0.5
        self._spills = itertools.count()

    # ----------------------------------------------------------- intake

    def drain(self, timeout: float = 0.0) -> None:
        """Move everything the child sent into the ordered pending list."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, body = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            except (EOFError, OSError):
                return
            self._accept(kind, body)
            timeout = 0.0
            deadline = time.monotonic()

    def _accept(self, kind: str, body: Any) -> None:
        if kind == "progress":
            self.progress = body
        elif kind == "result":
            self.result = body
        elif kind == "metrics":
            if (
                self.pending
                and self.pending[-1][0] == "metrics"
                and len(self.pending[-1][1]) < METRICS_BATCH
            ):
                self.pending[-1][1].extend(body)
            else:
                self.pending.append(("metrics", list(body)))
                self._batch_started = time.monotonic()
            self.points_in_memory += len(body)
            if self.points_in_memory > self.buffer_points:
                self._spill()
        else:
            self.pending.append((kind, body))

    def _spill(self) -> None:
        """Move buffered metric batches to disk, keeping their place in the order."""
        for index, (kind, body) in enumerate(self.pending):
            if kind == "metrics":
                path = self.spill_dir / f"{next(self._spills):08d}.json"
                atomic_write_text(path, json.dumps(body))
                self.pending[index] = ("spilled", str(path))
                self.points_in_memory -= len(body)

    # ---------------------------------------------------------- delivery

    def pump(self, *, flush: bool = False) -> None:
        """Send what is pending (in order) and heartbeat; never raises for a down API.

        A lone partial metrics batch younger than `hold_s` stays for more points,
        unless `flush` (the run is over) or something else waits behind it."""
        now = time.monotonic()
        if self.stale or now < self._retry_at:
            return
        try:
            while self.pending:
                kind, body = self.pending[0]
                if (
                    kind == "metrics"
                    and not flush
                    and len(self.pending) == 1
                    and len(body) < METRICS_BATCH
                    and now - self._batch_started < self.hold_s
                ):
                    break
                self._send(kind, body)
                self.pending.popleft()
                if kind == "metrics":
                    self.points_in_memory -= len(body)
            since = time.monotonic() - self._last_heartbeat
            # at most a heartbeat a second for progress, but the last one always (flush)
            fresh_progress = self.progress != self._progress_sent and (since >= 1.0 or flush)
            if fresh_progress or since >= self.heartbeat_every:
                self._heartbeat()
            self._backoff = 0.5
        except ApiUnavailable as exc:
            log.warning("API unreachable, buffering reports: %s", exc)
            self._retry_at = time.monotonic() + self._backoff
            # Retry at least thrice a lease, so a report lands within the grace
            # the API gives workers after it (or its database) comes back.
            self._backoff = min(self._backoff * 2, 10.0, self.heartbeat_every)
        except StaleAttempt:
            self._went_stale()

    def heartbeat(self) -> None:
        """Heartbeat now (the last progress again): sets `stale` when the attempt has ended."""
        try:
            self._heartbeat()
        except ApiUnavailable as exc:
            log.warning("API unreachable: %s", exc)
        except StaleAttempt:
            self._went_stale()

    def _went_stale(self) -> None:
        log.warning("job %s: this attempt is stale; stopping", self.job_id)
        self.stale = True
        self.cancel.set()

    def _heartbeat(self) -> None:
        progress = dict(self.progress)
        if self.client.heartbeat(self.job_id, progress):
            self.cancel.set()
        self._progress_sent = progress
        self._last_heartbeat = time.monotonic()

    def _send(self, kind: str, body: Any) -> None:
        if kind == "metrics":
            if self.client.metrics(self.job_id, body):
                self.cancel.set()
        elif kind == "spilled":
            path = Path(body)
            if self.client.metrics(self.job_id, json.loads(path.read_text())):
                self.cancel.set()
            path.unlink(missing_ok=True)
        elif kind == "checkpoint":
            path = Path(body["path"])
            if path.exists():
                self.client.checkpoint(self.job_id, body["kind"], body["epoch"], path, body)
                path.unlink(missing_ok=True)
        elif kind == "log":
            self.client.logs(self.job_id, body)

    @property
    def idle(self) -> bool:
        return not self.pending
