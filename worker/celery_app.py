"""The Celery app of GPU/CPU workers: one task, `torchyard.run_job(job_id)`.

Start a worker with `torchyard worker [--gpu N] [--queues gpu]` (one job per
process: prefetch 1, late ack, solo pool).
"""

from __future__ import annotations

import logging

from celery import Celery

from worker.settings import WorkerSettings, celery_config
from worker.task import run_claimed_job

settings = WorkerSettings()
app = Celery("torchyard")
app.conf.update(celery_config(settings.broker_url, settings.home))
logging.getLogger("torchyard").setLevel(logging.INFO)


@app.task(name="torchyard.run_job")
def run_job(job_id: str) -> str:
    """Tasks carry only the job id; the API holds the rest and answers the claim."""
    return run_claimed_job(job_id, settings)
