"""Attempts: a worker's claim on a job, its attempt-scoped token, heartbeats, finish and loss.

An attempt token is valid while its attempt is the job's current one and the job
is running; anything else is a stale attempt, and the worker stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound, StaleAttempt, Unauthorized
from app.ids import hash_token, new_token
from app.models import Attempt, Job, utcnow
from app.store import events, gangs, jobs
from app.store.metrics import finite_json

TOKEN_PREFIX = "tya"
WORKER_LOST = "worker lost"
RELEASED = "released"
LOST = "lost"  # the worker, or a rank or node of its run, was lost: a restart


@dataclass(frozen=True)
class AttemptRef:
    """Who is calling, as an attempt token says: plain values, safe outside a session."""

    attempt_id: int
    job_id: str
    n: int
    user_id: int


@dataclass(frozen=True)
class Claim:
    job: Job
    attempt: Attempt
    token: str


def claim(
    session: Session, job_id: str, worker: str, *, lease_s: float, max_running: int | None
) -> Claim:
    """Move `queued -> running` and start attempt n; Conflict when the job is not queued."""
    job = jobs.lock(session, job_id)
    if job.status != "queued":
        raise Conflict(f"job {job_id!r} is {job.status}, not queued")
    if max_running is not None:
        jobs.lock_user(session, job.user_id)
        running = jobs.running_count(session, job.user_id)
        if running >= max_running:
            # The job stays queued; the reconciler sends it again later.
            raise Conflict(
                f"the job's owner already has {running} running job(s) (limit {max_running})"
            )
    now = utcnow()
    won = jobs.transition(
        session,
        job_id,
        "queued",
        status="running",
        started_at=job.started_at or now,
        lease_expires_at=now + timedelta(seconds=lease_s),
    )
    if not won:
        raise Conflict(f"job {job_id!r} was claimed by another worker")
    token = new_token(TOKEN_PREFIX)
    attempt = Attempt(
        job_id=job_id, n=job.attempt, token_hash=hash_token(token), worker=worker[:255]
    )
    session.add(attempt)
    session.flush()
    events.append(
        session, job_id, "status", {"status": "running", "attempt": job.attempt, "worker": worker}
    )
    return Claim(job=jobs.lock(session, job_id), attempt=attempt, token=token)


def resolve(session: Session, raw_token: str, *, released_ok: bool = False) -> AttemptRef | None:
    """The attempt a token belongs to (None: unknown); StaleAttempt when it is no longer current.

    `released_ok`: an attempt its worker released still resolves (a retried release)."""
    row: Any = session.execute(
        select(Attempt, Job)
        .join(Job, Job.id == Attempt.job_id)
        .where(Attempt.token_hash == hash_token(raw_token))
    ).one_or_none()
    if row is None:
        row = _gang_member_attempt(session, raw_token)
    if row is None:
        return None
    attempt, job = row
    if not _is_current(attempt, job) and not (released_ok and attempt.outcome == RELEASED):
        raise StaleAttempt()
    return AttemptRef(attempt_id=attempt.id, job_id=job.id, n=attempt.n, user_id=job.user_id)


def _gang_member_attempt(session: Session, raw_token: str) -> tuple[Attempt, Job] | None:
    """A gang member's token stands for its gang's attempt (app/store/gangs.py)."""
    member = gangs.by_token(session, raw_token)
    if member is None:
        return None
    row = session.execute(
        select(Attempt, Job)
        .join(Job, Job.id == Attempt.job_id)
        .where(Attempt.job_id == member.job_id, Attempt.n == member.n)
    ).one_or_none()
    return None if row is None else (row[0], row[1])


def current(session: Session, ref: AttemptRef) -> tuple[Job, Attempt]:
    """Lock the job and check, inside this transaction, that the attempt still owns it."""
    job = jobs.lock(session, ref.job_id)
    attempt = session.get(Attempt, ref.attempt_id, populate_existing=True)
    if attempt is None or not _is_current(attempt, job):
        raise StaleAttempt()
    return job, attempt


def lock_by_token(session: Session, raw_token: str, job_id: str) -> Job:
    """`resolve` and `current` in one statement, for the hottest report (metrics): the
    token's job under its row lock, checked to be `job_id` and run by the token's attempt.

    Unauthorized for an unknown token, NotFound for another job's, StaleAttempt for an
    attempt that is no longer current (the same answers as the two calls).
    """
    row = session.execute(
        select(Job, Attempt)
        .join(Attempt, Attempt.job_id == Job.id)
        .where(Attempt.token_hash == hash_token(raw_token))
        .with_for_update(of=Job)
        .execution_options(populate_existing=True)
    ).one_or_none()
    if row is None:
        raise Unauthorized("invalid attempt token")
    job, attempt = row
    if not _is_current(attempt, job):
        raise StaleAttempt()
    if job.id != job_id:
        raise NotFound(f"no job {job_id!r} for this attempt")
    return job


def _is_current(attempt: Attempt, job: Job) -> bool:
    return attempt.n == job.attempt and attempt.ended_at is None and job.status == "running"


def extend_lease(job: Job, lease_s: float) -> None:
    job.lease_expires_at = utcnow() + timedelta(seconds=lease_s)


def heartbeat(session: Session, ref: AttemptRef, progress: dict[str, Any], lease_s: float) -> bool:
    """Extend the lease, record progress; returns whether a cancel was requested."""
    job, attempt = current(session, ref)
    extend_lease(job, lease_s)
    now = utcnow()
    step = progress.get("step")
    if step is not None and attempt.first_step is None:
        attempt.first_step, attempt.first_step_at = int(step), now
    job.progress = {**progress, "eta_s": _eta(progress, attempt, now)}
    return job.cancel_requested


def _eta(progress: dict[str, Any], attempt: Attempt, now: datetime) -> float | None:
    step, epochs, per_epoch = (
        progress.get("step"),
        progress.get("epochs"),
        progress.get("steps_per_epoch"),
    )
    if None in (step, epochs, per_epoch, attempt.first_step, attempt.first_step_at):
        return None
    done = step - attempt.first_step  # type: ignore[operator]
    if done <= 0:
        return None
    elapsed = (now - attempt.first_step_at).total_seconds()  # type: ignore[operator]
    remaining = max(0, epochs * per_epoch - step)  # type: ignore[operator]
    return round(elapsed / done * remaining, 1)


def finish(session: Session, ref: AttemptRef, status: str, result: dict[str, Any]) -> Job:
    """End the run in a terminal state with what the worker's RunResult says."""
    job, attempt = current(session, ref)
    now = utcnow()
    result = finite_json(result)
    error = result.get("error")
    if status == "failed" and not error:
        error = "the run failed without a reason from the worker"
    values = jobs.finish_values(
        status,
        now,
        best_epoch=result.get("best_epoch"),
        best_monitor=result.get("monitor"),
        best_value=result.get("best_value"),
        stopped_early=bool(result.get("stopped_early")),
        stop_reason=result.get("stop_reason"),
        error=error if status == "failed" else None,
        result=result,
    )
    if not jobs.transition(session, job.id, "running", **values):
        raise StaleAttempt()
    attempt.ended_at, attempt.outcome = now, status
    jobs.announce_end(
        session, job.id, status, error=values["error"], stop_reason=values["stop_reason"]
    )
    return jobs.lock(session, job.id)


@dataclass(frozen=True)
class Released:
    job: Job
    requeued: bool  # False: a retry of a release already done, or the job ended cancelled


def release(session: Session, ref: AttemptRef, reason: str, *, lost: bool = False) -> Released:
    """A worker that stops before its job ends hands it back: `running -> queued` at once.

    Guarded by the attempt (only the current one may release), idempotent (a
    retried release of this attempt changes nothing), and attempt + 1 as for a lost
    worker, but it uses none of `max_restarts`: nothing went wrong. A job whose
    cancel was requested ends `cancelled` instead.

    `lost`: the attempt was lost rather than handed back (a rank or node of a
    data-parallel run died): it counts against `max_restarts` as a lost worker's
    does, and past them the job fails with `reason`. A retry of it is stale (409).
    """
    job = jobs.lock(session, ref.job_id)
    attempt = session.get(Attempt, ref.attempt_id, populate_existing=True)
    if attempt is not None and attempt.outcome == RELEASED:
        return Released(job, requeued=False)
    if attempt is None or not _is_current(attempt, job):
        raise StaleAttempt()
    now = utcnow()
    attempt.ended_at, attempt.outcome = now, LOST if lost else RELEASED
    if lost:
        requeued = _requeue_or_fail(session, job, now, reason)
        return Released(jobs.lock(session, job.id), requeued)
    if job.cancel_requested:
        stop_reason = f"cancelled by user ({reason})"
        values = jobs.finish_values("cancelled", now, stop_reason=stop_reason)
        if not jobs.transition(session, job.id, "running", **values):
            raise StaleAttempt()
        jobs.announce_end(session, job.id, "cancelled", stop_reason=stop_reason)
        return Released(jobs.lock(session, job.id), requeued=False)
    if not _requeue(session, job, now, reason):
        raise StaleAttempt()
    return Released(jobs.lock(session, job.id), requeued=True)


def _requeue(session: Session, job: Job, now: datetime, reason: str) -> bool:
    """`running -> queued` as attempt + 1, with its status event; False if not running."""
    n = job.attempt + 1
    if not jobs.transition(
        session,
        job.id,
        "running",
        status="queued",
        attempt=n,
        lease_expires_at=None,
        dispatched_at=now,
    ):
        return False
    events.append(session, job.id, "status", {"status": "queued", "attempt": n, "reason": reason})
    return True


def _released_count(session: Session, job_id: str) -> int:
    stmt = select(func.count()).where(Attempt.job_id == job_id, Attempt.outcome == RELEASED)
    return session.execute(stmt).scalar_one()


def expire(session: Session, now: datetime) -> list[Job]:
    """Running jobs whose lease ran out: back to queued (attempt + 1) or, past max_restarts, failed.

    Returns the jobs put back in the queue, for the caller to dispatch after commit.
    """
    requeued = []
    for job in jobs.expired_leases(session, now):
        attempt = session.execute(
            select(Attempt).where(Attempt.job_id == job.id, Attempt.n == job.attempt)
        ).scalar_one_or_none()
        if attempt is not None and attempt.ended_at is None:
            attempt.ended_at, attempt.outcome = now, LOST
        reason = f"{WORKER_LOST}: no heartbeat within the lease"
        if _requeue_or_fail(session, job, now, reason, event_reason=WORKER_LOST):
            requeued.append(job)
    return requeued


def _requeue_or_fail(
    session: Session, job: Job, now: datetime, reason: str, *, event_reason: str | None = None
) -> bool:
    """A lost attempt's job (running): queued again (attempt + 1; True) while restarts
    are left, else failed with `reason`; cancelled when its cancel was requested."""
    # Attempts their workers released (a shutdown) are no restarts: only losses count.
    released = _released_count(session, job.id)
    if job.cancel_requested:
        # The user asked to stop it anyway: losing the worker finishes the job.
        values = jobs.finish_values("cancelled", now, stop_reason="cancelled by user (worker lost)")
        if jobs.transition(session, job.id, "running", **values):
            jobs.announce_end(session, job.id, "cancelled", stop_reason=values["stop_reason"])
        return False
    if job.attempt < job.max_restarts + 1 + released:
        return _requeue(session, job, now, event_reason or reason)
    error = f"{reason} on attempt {job.attempt} of {job.max_restarts + 1 + released}"
    if jobs.transition(
        session, job.id, "running", **jobs.finish_values("failed", now, error=error)
    ):
        jobs.announce_end(session, job.id, "failed", error=error)
    return False
