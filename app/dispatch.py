"""Dispatch: wake a worker with the Celery task `torchyard.run_job(job_id)`.

The database is the source of truth and the broker only carries wake-ups, so a
send happens after the job's row is committed, and a failed send fails nothing:
the reconciler sends again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.exceptions import ChannelError
from sqlalchemy import event
from sqlalchemy.orm import Session

from worker.settings import QUEUES, gpu_queue
from worker.settings import celery_config as worker_celery_config

log = logging.getLogger(__name__)

TASK_NAME = "torchyard.run_job"
# A send is only a wake-up: give up fast and let the reconciler retry.
PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}


__all__ = ["QUEUES", "Dispatcher", "queue_for", "send_after_commit"]


def queue_for(spec: Any, *, gpu_first: bool = True) -> str:
    """`gpu` for jobs that need one (resources.gpus 1, or a cuda device), `gpuN` for jobs
    of N GPUs a node, `cpu` for jobs that must not take one, `auto` for the rest (device
    auto): a free GPU worker takes them, and the reconciler hands them to the `cpu`
    queue after auto_gpu_wait_s. `gpu_first=False` (auto_gpu_wait_s 0: no GPU workers)
    sends those to `cpu` at once."""
    gpus = spec.resources.gpus
    device = spec.training.device
    if gpus:
        return gpu_queue(gpus)
    if gpus is None and device.startswith("cuda"):
        return "gpu"
    if gpus == 0 or device == "cpu":
        return "cpu"
    return "auto" if gpu_first else "cpu"


# One definition for senders (here) and consumers (worker/celery_app.py): the
# embedded filesystem broker only works when both use the same folders.
celery_config = worker_celery_config


class Dispatcher:
    """Sends wake-ups and reads queue depths; safe to share between threads."""

    def __init__(self, broker_url: str, home: Path):
        self.broker_url = broker_url
        self.celery = Celery("torchyard-api", set_as_current=False)
        self.celery.conf.update(celery_config(broker_url, home))
        self._lock = threading.Lock()
        self._queues = set(QUEUES)  # whose depths the reconciler reads

    def watched_queues(self) -> list[str]:
        """The queues whose depths the reconciler reads: ours, and each `gpuN` seen."""
        with self._lock:
            return sorted(self._queues)

    def watch(self, queue: str) -> None:
        with self._lock:
            self._queues.add(queue)

    def send(self, job_id: str, queue: str) -> bool:
        """Publish the task; False (logged) when the broker is unreachable."""
        try:
            with self._lock:
                self._queues.add(queue)
                self.celery.send_task(
                    TASK_NAME, args=[job_id], queue=queue, retry=True, retry_policy=PUBLISH_RETRY
                )
        except Exception as exc:  # any broker failure: the reconciler re-sends
            log.warning("could not send job %s to queue %s: %s", job_id, queue, exc)
            return False
        return True

    def queue_depth(self, queue: str) -> int | None:
        """Messages waiting in `queue`; None when the broker cannot be asked."""
        try:
            with self._lock, self.celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=0, timeout=2)
                channel = connection.default_channel
                try:
                    return channel.queue_declare(queue=queue, passive=True).message_count
                except ChannelError:
                    return 0  # never declared, or drained and removed: nothing waiting
        except Exception as exc:
            log.warning("could not read the depth of queue %s: %s", queue, exc)
            return None

    def ping(self) -> None:
        """Raise unless the broker answers."""
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=0, timeout=2)
            # opening a channel makes a round trip (redis PINGs; the filesystem lists its folder)
            with contextlib.suppress(ChannelError):
                connection.default_channel.queue_declare(queue=QUEUES[0], passive=True)

    def close(self) -> None:
        self.celery.close()


def send_after_commit(session: Session, dispatcher: Dispatcher, job_id: str, queue: str) -> None:
    """Send the wake-up once this session's transaction commits (never for a rollback)."""
    pending: list[tuple[str, str]] | None = session.info.get("dispatch")
    if pending is None:
        pending = session.info["dispatch"] = []

        def flush(_session: Session) -> None:
            sends, pending[:] = list(pending), []
            for job, name in sends:
                dispatcher.send(job, name)

        def discard(_session: Session) -> None:
            pending.clear()

        event.listen(session, "after_commit", flush)
        event.listen(session, "after_rollback", discard)
    pending.append((job_id, queue))
