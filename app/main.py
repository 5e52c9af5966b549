"""The API application: `create_app(settings)` wires database, artifacts, broker and routes."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import tenacity
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from app.api.errors import install_error_handlers
from app.api.limits import BodyLimits
from app.api.routes import (
    checkpoints,
    datasets,
    events,
    health,
    jobs,
    projects,
    session,
    usage,
    worker,
)
from app.api.schemas import ERROR_RESPONSES, JobOut
from app.api.token_cache import TokenCache
from app.artifacts import ArtifactStore
from app.bootstrap import FIRST_USER
from app.config import Settings, get_settings, with_worker_token
from app.db import (
    Sessions,
    is_connection_error,
    make_engine,
    make_read_sessions,
    make_sessions,
    session_scope,
)
from app.dispatch import Dispatcher
from app.job_reads import ReadModels
from app.migrate import upgrade_engine
from app.protocol import API_PREFIX
from app.reconciler import Reconciler
from app.store import users
from app.submission import preload
from app.sweep import sweep
from app.telemetry import LatencyMiddleware, Telemetry
from app.web_pages import mount_web

log = logging.getLogger(__name__)

DESCRIPTION = """Submit PyTorch training jobs as JSON specs, follow them, download their weights.

Every endpoint but health needs `Authorization: Bearer <token>`, or the dashboard's
session cookie (`POST /api/v1/session`); with the cookie, a request that changes
state also needs the session's `X-CSRF-Token` header."""


def create_app(settings: Settings | None = None, *, reconcile: bool = True) -> FastAPI:
    """The API. Migrations run at startup; `reconcile=False` keeps the reconciler thread off."""
    settings = with_worker_token(settings or get_settings())
    engine = make_engine(settings.database_url)
    sessions = make_sessions(engine)
    artifacts = ArtifactStore(settings.artifact_dir)
    dispatcher = Dispatcher(settings.broker_url, settings.home)
    telemetry = Telemetry(sessions)
    read_models = ReadModels.create(engine, sessions, render_job=JobOut.render)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(migrate_when_reachable, engine, settings.db_wait_s)
        if settings.token:
            await run_in_threadpool(ensure_admin_token, sessions, settings.token)
        # What a crash left (files no row names, rows without files): app/sweep.py
        await run_in_threadpool(sweep, sessions, artifacts, grace_s=settings.orphan_grace_s)
        await run_in_threadpool(preload)
        # What is loaded by now (torch, the app) lives as long as the process: keep the
        # collector from walking it again on every full collection (with torch
        # imported, each such pass stalls every request for ~0.2 s).
        gc.freeze()
        # Last, just before serving: the grace the reconciler gives workers to report
        # after a restart counts from here, not from before a slow import.
        reconciler = Reconciler(sessions, settings, dispatcher) if reconcile else None
        if reconciler:
            reconciler.start()
        try:
            yield
        finally:
            if reconciler:
                reconciler.stop()
            await read_models.close()
            dispatcher.close()
            engine.dispose()

    app = FastAPI(title="torchyard", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.read_models = read_models
    app.state.read_sessions = make_read_sessions(engine)
    app.state.artifacts = artifacts
    app.state.dispatcher = dispatcher
    app.state.telemetry = telemetry
    app.state.token_cache = TokenCache(settings.token_cache_s)

    install_error_handlers(app)
    app.include_router(health.router, prefix=API_PREFIX)
    for router in (
        session.router,
        jobs.shown,
        datasets.router,
        jobs.router,
        events.router,
        checkpoints.router,
        projects.router,
        usage.router,
    ):
        app.include_router(router, prefix=API_PREFIX, responses=ERROR_RESPONSES)
    app.include_router(worker.claims, prefix=API_PREFIX, responses=ERROR_RESPONSES)
    app.include_router(worker.reports, prefix=API_PREFIX, responses=ERROR_RESPONSES)
    app.include_router(worker.router, prefix=API_PREFIX, responses=ERROR_RESPONSES)
    app.include_router(worker.releases, prefix=API_PREFIX, responses=ERROR_RESPONSES)
    # the conventional unprefixed probes, for load balancers and Prometheus
    app.include_router(health.router, include_in_schema=False)
    mount_web(app)  # the dashboard at /

    app.add_middleware(BodyLimits, settings=settings, prefix=API_PREFIX)
    app.add_middleware(LatencyMiddleware, telemetry=telemetry, prefix=API_PREFIX)
    return app


def ensure_admin_token(sessions: Sessions, token: str) -> None:
    """TORCHYARD_TOKEN logs in as the first user from the first start (deployments set it)."""
    try:
        with session_scope(sessions) as session:
            users.ensure_token(session, FIRST_USER, token)
    except IntegrityError:
        pass  # another API process registered it at the same moment


def migrate_when_reachable(engine: Engine, wait_s: float) -> None:
    """Run migrations, waiting up to `wait_s` for a database that is still starting (compose).

    Only connection errors are waited out; any other error (a failed migration) is raised at once.
    """
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_connection_error),
        stop=tenacity.stop_after_delay(wait_s),
        wait=tenacity.wait_fixed(1),
        before_sleep=_log_unreachable,
        reraise=True,
    )
    retrying(upgrade_engine, engine)


def _log_unreachable(retry_state: tenacity.RetryCallState) -> None:
    outcome = retry_state.outcome
    exc = outcome.exception() if outcome else None
    first_line = next(iter(str(exc).splitlines()), "")
    log.warning("database not reachable yet (%s); retrying", first_line)
