"""Prometheus metrics: jobs by state and queue depth read from the database at scrape
time (true across API processes), and a request latency histogram."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import Sessions, session_scope
from app.dispatch import QUEUES
from app.models import JOB_STATUSES
from app.store import jobs

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class JobCollector(Collector):
    def __init__(self, sessions: Sessions):
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        try:
            with session_scope(self.sessions) as session:
                by_status = jobs.counts_by_status(session)
                by_queue = jobs.queued_by_queue(session)
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("metrics: cannot read job counts: %s", exc)
            return
        states = GaugeMetricFamily("torchyard_jobs", "Jobs by state", labels=["status"])
        for status in JOB_STATUSES:
            states.add_metric([status], by_status.get(status, 0))
        yield states
        depth = GaugeMetricFamily("torchyard_queue_depth", "Queued jobs by queue", labels=["queue"])
        for queue in sorted({*QUEUES, *by_queue}):
            depth.add_metric([queue], by_queue.get(queue, 0))
        yield depth


class Telemetry:
    """One registry per app, so several apps in one process (tests) do not collide."""

    def __init__(self, sessions: Sessions):
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "torchyard_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(JobCollector(sessions))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyMiddleware:
    """Times each request until its response starts (a stream's length is not its latency)."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry, prefix: str):
        self.app = app
        self.telemetry = telemetry
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                template = self._template(scope)
                self.telemetry.latency.labels(scope["method"], template, str(status)).observe(
                    time.perf_counter() - started
                )
            await send(message)

        await self.app(scope, receive, timed_send)

    def _template(self, scope: Scope) -> str:
        """The route template (/api/v1/jobs/{job_id}), not the path: one series per route."""
        route = scope.get("route")
        template = getattr(route, "path", None)
        if template is None:
            return "unmatched"
        # FastAPI keeps an included router's own paths; put the prefix back
        if scope["path"].startswith(self.prefix + "/") and not template.startswith(self.prefix):
            template = self.prefix + template
        return template
