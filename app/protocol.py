"""The worker protocol's operations: claim a job, then report metrics, logs, checkpoints.

Each report is also a heartbeat (it extends the lease), appends a job event for
SSE watchers, and answers whether a cancel was requested. Metrics and
checkpoints are keyed, so a retry stores nothing twice; log lines have no key,
so a retried batch of lines shows twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import retention
from app.artifacts import ArtifactStore, TempFile, job_folder
from app.config import Settings
from app.db import Sessions, session_scope
from app.dispatch import Dispatcher, send_after_commit
from app.errors import BadRequest, Conflict
from app.models import Checkpoint, Job
from app.store import attempts, checkpoints, datasets, events, metric_reports, metrics
from app.store.attempts import AttemptRef
from app.store.gangs import join as join_gang
from app.store.gangs import nodes_of
from app.store.jobs import lock as lock_job
from app.store.metric_rollups import Point

API_PREFIX = "/api/v1"
MAX_LOG_LINE = 10_000
WRITE_BUFFER = 1 << 20


def claim_job(
    session: Session,
    job_id: str,
    worker: str,
    settings: Settings,
    host: str | None = None,
    port: int | None = None,
) -> dict[str, Any]:
    """Start an attempt; the answer carries everything the worker needs to run it.

    A job of several nodes is joined instead (app/store/gangs.py): the answer's
    token is the member's, and `gang` says to wait until the gang is whole."""
    job = lock_job(session, job_id)
    if job.status == "queued" and nodes_of(job) > 1:
        return _join_gang(session, job, worker, settings, host, port)
    claim = attempts.claim(
        session,
        job_id,
        worker,
        lease_s=settings.lease_s,
        max_running=settings.max_running_jobs_per_user,
    )
    has_state = checkpoints.exists(session, job_id, "last")
    return {
        "attempt": claim.attempt.n,
        "token": claim.token,
        "spec": claim.job.spec,
        "lease_s": settings.lease_s,
        "datasets": _dataset_refs(session, job_id),
        "resume": {"url": f"{API_PREFIX}/worker/jobs/{job_id}/resume"} if has_state else None,
    }


def _dataset_refs(session: Session, job_id: str) -> dict[str, Any]:
    # keyed by the ref as written in the spec, which in the service is the dataset id
    return {
        d.id: {
            "url": f"{API_PREFIX}/worker/datasets/{d.id}",
            "sha256": d.sha256,
            "filename": d.name,
            "format": d.format,
        }
        for d in datasets.of_job(session, job_id)
    }


def _join_gang(
    session: Session,
    job: Job,
    worker: str,
    settings: Settings,
    host: str | None,
    port: int | None,
) -> dict[str, Any]:
    if not host or not port:
        raise Conflict(f"job {job.id!r} runs on several nodes: the claim must give host and port")
    joined = join_gang(
        session, job, worker, host, port, wait_s=settings.gang_wait_s, lease_s=settings.lease_s
    )
    # The resume state is looked up once the gang is whole (it may change meanwhile).
    return {
        "attempt": joined.member.n,
        "token": joined.token,
        "spec": job.spec,
        "lease_s": settings.lease_s,
        "datasets": _dataset_refs(session, job.id),
        "resume": None,
        "gang": {"member": joined.member.member, "wait_s": settings.gang_wait_s},
    }


def record_metrics(
    session: Session,
    job: Job,
    points: list[dict[str, Any]],
    lease_s: float,
    *,
    pipeline: bool | None = None,
) -> tuple[int, bool]:
    """Store the points not stored yet; returns (how many were new, cancel requested).
    The caller holds the job's row lock (`attempts.lock_by_token`).

    Each statement is a round trip to the database, and per batch they cost more
    than the points themselves. With `pipeline` (by default where the driver has
    it: Postgres) every write and the COMMIT go in one round trip
    (app/store/metric_reports.py), and the transaction is committed on return.
    Otherwise the job row's changes (lease, latest values, progress) go out as one
    UPDATE with the event's INSERT, after the points' statements, and the caller
    commits.
    """
    cancel = job.cancel_requested
    with session.no_autoflush:
        new = metrics.plan_points(session, job, points)
    attempts.extend_lease(job, lease_s)
    if new.series:
        _advance_progress(job, new.newest())
    if pipeline if pipeline is not None else metric_reports.can_pipeline(session):
        metric_reports.commit(session, job, new)
        return new.count, cancel
    metrics.run_writes(session, new.writes)
    if new.series:
        # The event names the chunks the points went to; streams read them from there
        # (app.event_stream), so a batch of thousands of points is not stored twice.
        events.append(session, job.id, "metrics", {"chunks": new.chunk_keys()})
    return new.count, cancel


def _advance_progress(job: Job, newest: Point) -> None:
    # Points carry step and epoch, so progress moves between heartbeats too.
    step, epoch = newest[0], newest[1]
    progress = dict(job.progress or {})
    if step > progress.get("step", -1):
        progress.update(step=step, epoch=epoch)
        job.progress = progress


def release_attempt(
    session: Session, dispatcher: Dispatcher, ref: AttemptRef, reason: str, *, lost: bool = False
) -> Job:
    """The worker stops before the job ends: requeue it now and wake a worker after commit.

    Without the wake-up the job would wait for the reconciler's re-send of lost
    messages (`requeue_after_s`); with it, a worker resumes it at once.
    """
    released = attempts.release(session, ref, reason[:200], lost=lost)
    if released.requeued:
        for _ in range(nodes_of(released.job)):  # a gang: a wake-up for each worker
            send_after_commit(session, dispatcher, released.job.id, released.job.queue)
    return released.job


def record_logs(session: Session, ref: AttemptRef, lines: list[str], lease_s: float) -> None:
    job, _ = attempts.current(session, ref)
    attempts.extend_lease(job, lease_s)
    if lines:
        events.append(session, job.id, "log", {"lines": [line[:MAX_LOG_LINE] for line in lines]})


async def receive_checkpoint(
    sessions: Sessions,
    artifacts: ArtifactStore,
    ref: AttemptRef,
    body: AsyncIterator[bytes],
    *,
    sha256: str,
    kind: str,
    epoch: int,
    step: int,
    monitor: str | None,
    value: float | None,
    lease_s: float,
) -> Checkpoint:
    """Stream the body to a temp file, check it against `sha256`, then move it in and record it."""
    with artifacts.writing() as temp:
        buffer = bytearray()
        async for chunk in body:
            buffer += chunk
            if len(buffer) >= WRITE_BUFFER:
                await run_in_threadpool(temp.write, bytes(buffer))
                buffer.clear()
        await run_in_threadpool(temp.write, bytes(buffer))
        if temp.sha256 != sha256.lower():
            raise BadRequest(f"X-Sha256 does not match the body (body sha256 is {temp.sha256})")
        return await run_in_threadpool(
            _store_checkpoint,
            sessions,
            artifacts,
            ref,
            temp,
            kind,
            epoch,
            step,
            monitor,
            value,
            lease_s,
        )


def _store_checkpoint(
    sessions: Sessions,
    artifacts: ArtifactStore,
    ref: AttemptRef,
    temp: TempFile,
    kind: str,
    epoch: int,
    step: int,
    monitor: str | None,
    value: float | None,
    lease_s: float,
) -> Checkpoint:
    checkpoint, dropped = commit_checkpoint(
        sessions, artifacts, ref, temp, kind, epoch, step, monitor, value, lease_s
    )
    retention.unlink_unreferenced(sessions, artifacts, ref.job_id, dropped)
    return checkpoint


def commit_checkpoint(
    sessions: Sessions,
    artifacts: ArtifactStore,
    ref: AttemptRef,
    temp: TempFile,
    kind: str,
    epoch: int,
    step: int,
    monitor: str | None,
    value: float | None,
    lease_s: float,
) -> tuple[Checkpoint, list[str]]:
    """Move the file in, record its row and delete the rows it supersedes, in one commit.

    Returns the checkpoint and the paths of the deleted rows, which the caller unlinks
    after this commit (app/retention.py says why this survives a crash at any point).
    """
    with session_scope(sessions) as session:
        job, _ = attempts.current(session, ref)
        attempts.extend_lease(job, lease_s)
        relative = _place(session, artifacts, job.id, temp, kind, epoch)
        recorded = checkpoints.record(
            session,
            job_id=job.id,
            kind=kind,
            epoch=epoch,
            step=step,
            monitor=monitor,
            value=metrics.finite(value),
            size=temp.size,
            sha256=temp.sha256,
            path=relative,
        )
        dropped = retention.enforce(session, artifacts, job)
        if recorded.replaced_path:
            dropped.append(recorded.replaced_path)
        # a late retry of a checkpoint the job no longer keeps is stored and dropped at once
        if recorded.created and not inspect(recorded.checkpoint).deleted:
            events.append(session, job.id, "checkpoint", checkpoint_json(recorded.checkpoint))
    return recorded.checkpoint, dropped


def _place(
    session: Session, artifacts: ArtifactStore, job_id: str, temp: TempFile, kind: str, epoch: int
) -> str:
    """Move the upload into the job's folder, unless a file of these bytes is there already
    (`best` and `top_k` of one epoch): then the temp is dropped and that file is named."""
    suffix = "pt" if kind == "last" else "safetensors"
    same = checkpoints.with_sha(session, job_id, temp.sha256)
    if same is not None and same.path.endswith(f".{suffix}") and artifacts.exists(same.path):
        return same.path
    # The sha in the name keeps every recorded row's file immutable: a
    # re-upload with other bytes gets a new file, never overwrites a served one.
    relative = f"{job_folder(job_id)}/checkpoints/{kind}-{epoch}-{temp.sha256[:16]}.{suffix}"
    artifacts.commit(temp, relative)
    return relative


def checkpoint_json(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "id": checkpoint.id,
        "epoch": checkpoint.epoch,
        "kind": checkpoint.kind,
        "step": checkpoint.step,
        "monitor": checkpoint.monitor,
        "value": checkpoint.value,
        "size": checkpoint.size,
        "sha256": checkpoint.sha256,
        "created_at": checkpoint.created_at.isoformat(),
    }
