"""The reconciler: expires leases of lost workers and re-sends wake-ups the broker lost.

It runs in a background thread of every API process; guarded transitions make
concurrent rounds in several processes safe.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Sessions, session_scope
from app.dispatch import Dispatcher, send_after_commit
from app.errors import DatabaseUnavailable
from app.models import utcnow
from app.store import attempts, gangs, jobs

log = logging.getLogger(__name__)


@dataclass
class Report:
    requeued: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    to_cpu: list[str] = field(default_factory=list)


def reconcile(
    session: Session, settings: Settings, dispatch: Dispatcher, *, expire_leases: bool = True
) -> Report:
    """One round; the wake-ups it decides on are sent after the session commits.

    `expire_leases=False` skips lease expiry: the caller knows workers could not
    reach the API (or the API its database) within the last lease.
    """
    # Ask the broker before the first query: on SQLite the transaction holds the
    # write lock, and a slow broker must not hold up every writer.
    depths = {queue: dispatch.queue_depth(queue) for queue in dispatch.watched_queues()}
    now = utcnow()
    report = Report()
    # Lost messages first: jobs requeued below have not been sent yet, and would
    # otherwise count as lost.
    for job_id, queue in _lost_wakeups(session, settings, dispatch, depths, now):
        send_after_commit(session, dispatch, job_id, queue)
        report.resent.append(job_id)
    for job in attempts.expire(session, now) if expire_leases else []:
        for _ in range(gangs.nodes_of(job)):  # a gang: a wake-up for each worker
            send_after_commit(session, dispatch, job.id, job.queue)
        report.requeued.append(job.id)
    for job_id in _auto_to_cpu(session, settings, now):
        send_after_commit(session, dispatch, job_id, "cpu")
        report.to_cpu.append(job_id)
    return report


def _auto_to_cpu(session: Session, settings: Settings, now: datetime) -> list[str]:
    """`auto` jobs no GPU worker took within auto_gpu_wait_s: now the `cpu` queue's too.

    Their `auto` message stays: whichever worker claims first runs the job, and the
    other finds it claimed. The job's queue becomes `cpu`, so a later re-send (lost
    message, lost worker) goes there.
    """
    if settings.auto_gpu_wait_s <= 0:
        return []
    cutoff = now - timedelta(seconds=settings.auto_gpu_wait_s)
    moved = []
    for job in jobs.stale_queued(session, cutoff, "auto", limit=1000):
        job.queue, job.dispatched_at = "cpu", now
        moved.append(job.id)
    return moved


def _lost_wakeups(
    session: Session,
    settings: Settings,
    dispatch: Dispatcher,
    depths: dict[str, int | None],
    now: datetime,
) -> list[tuple[str, str]]:
    """Queued jobs unclaimed for requeue_after_s whose message is no longer in the broker.

    A queue holding fewer messages than it has queued jobs has lost some; the jobs
    waiting longest since their last send get a new one. A job merely waiting its
    turn behind busy workers still has its message, so it is not sent twice. A queue
    this process has not seen yet (a `gpuN` another API process sent to) is read from
    the next round on.
    """
    cutoff = now - timedelta(seconds=settings.requeue_after_s)
    lost: list[tuple[str, str]] = []
    for queue, queued in sorted(jobs.queued_by_queue(session).items()):
        if queue not in depths:
            dispatch.watch(queue)
        depth = depths.get(queue)
        if depth is None or queued <= depth:
            continue  # broker unreachable (a send would fail too), or nothing lost
        for job in jobs.stale_queued(session, cutoff, queue, limit=queued - depth):
            job.dispatched_at = now
            lost.append((job.id, queue))
    return lost


class Reconciler:
    """Calls `reconcile` every `interval_s` in a daemon thread until stopped.

    Leases expire only once this process has served for a whole lease: while the
    API (or its database) was down, no worker could heartbeat, and a lease that
    ran out meanwhile says nothing about the worker. Each gets a full lease to
    deliver what it buffered before its job is taken from it.
    """

    def __init__(self, sessions: Sessions, settings: Settings, dispatch: Dispatcher):
        self.sessions = sessions
        self.settings = settings
        self.dispatch = dispatch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torchyard-reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        serving_since = time.monotonic()
        while not self._stop.wait(self.settings.reconcile_interval_s):
            expire = time.monotonic() - serving_since >= self.settings.lease_s
            try:
                with session_scope(self.sessions) as session:
                    report = reconcile(session, self.settings, self.dispatch, expire_leases=expire)
                if report.requeued or report.resent or report.to_cpu:
                    log.info(
                        "reconciler: requeued %s, re-sent %s, auto to cpu %s",
                        report.requeued,
                        report.resent,
                        report.to_cpu,
                    )
            except DatabaseUnavailable:
                serving_since = time.monotonic()  # nor could workers report: a fresh lease
                log.warning("reconciler: database unavailable")
            except Exception:  # a bad round must not end the thread; the next one retries
                log.exception("reconciler round failed")
