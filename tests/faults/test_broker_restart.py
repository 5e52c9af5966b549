"""Redis restarted (kill -9, no persistence) with jobs running and queued: the
broker forgets every message, the database remembers every job.
"""

from __future__ import annotations

import pytest

from tests.faults.conftest import FAST_RECOVERY, spec_for, wait_status
from tests.test_service_e2e import upload_digits, wait_for


@pytest.mark.slow
def test_no_job_is_lost_or_run_twice_when_redis_restarts(
    fresh_database, private_redis, make_stack, examples_dir
):
    stack = make_stack(fresh_database, private_redis.url, **FAST_RECOVERY)
    stack.start_api()
    for name in ("w0", "w1"):
        stack.start_worker(name)
    client = stack.client()
    train_id, val_id = upload_digits(client, examples_dir)
    spec = spec_for(train_id, val_id, epochs=3)
    stack.wait_workers_listening()
    ids = [client.submit(spec).id for _ in range(3)]

    def two_running() -> list[str] | None:
        statuses = {i: client.job(i).status for i in ids}
        waiting = [i for i, s in statuses.items() if s == "queued"]
        running = [i for i, s in statuses.items() if s == "running"]
        return waiting if len(running) == 2 and len(waiting) == 1 else None

    (waiting,) = wait_for(two_running, timeout=120, every=0.1)
    assert private_redis.queue_lengths()["cpu"] == 1  # the waiting job's wake-up
    sent_at = stack.sql("SELECT dispatched_at FROM jobs WHERE id = %s", waiting)[0][0]

    private_redis.kill()
    private_redis.start()
    assert private_redis.queue_lengths() == {"cpu": 0, "gpu": 0}  # the broker forgot it

    finals = [wait_status(client, i, {"succeeded", "failed", "cancelled"}) for i in ids]
    assert [f["status"] for f in finals] == ["succeeded"] * 3, stack.tail()
    # each job was claimed once: one attempt, so never two runs of it at once
    assert [f["attempt"] for f in finals] == [1, 1, 1]
    assert all(len(stack.attempts(i)) == 1 for i in ids)
    # the reconciler sent the waiting job's wake-up again
    resent_at = stack.sql("SELECT dispatched_at FROM jobs WHERE id = %s", waiting)[0][0]
    assert resent_at > sent_at
