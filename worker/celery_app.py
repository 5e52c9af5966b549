"""The Celery app of GPU/CPU workers: one task, `torchyard.run_job(job_id)`.

Start a worker with `torchyard worker [--gpu N] [--queues gpu]` (one job per
process: prefetch 1, late ack, solo pool).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject

from worker.settings import WorkerSettings, celery_config
from worker.task import STOPPING, request_stop, run_claimed_job

settings = WorkerSettings()
app = Celery("torchyard")
app.conf.update(celery_config(settings.broker_url, settings.home))
logging.getLogger("torchyard").setLevel(logging.INFO)


@app.task(name="torchyard.run_job")
def run_job(job_id: str) -> str:
    """Tasks carry only the job id; the API holds the rest and answers the claim."""
    outcome = run_claimed_job(job_id, settings)
    if outcome == STOPPING:
        # Taken while shutting down (Celery reads once more after the stop): back to
        # the broker, unclaimed, for the next worker.
        raise Reject("worker shutting down", requeue=True)
    return outcome


@signals.worker_shutting_down.connect
def _hand_back_the_running_job(sig: str = "", **_: Any) -> None:
    """SIGTERM or Ctrl-C (a warm shutdown): stop the running job now, not at its end.

    Called inside the signal handler: request_stop only sets attributes."""
    request_stop(f"worker stopping ({sig or 'shutdown'})")
