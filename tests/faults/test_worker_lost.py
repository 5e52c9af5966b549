"""A job whose workers are all gone: once its restarts are used up it ends failed.

The lease is 3 s here instead of the default 30 s (TORCHYARD_LEASE_S); the
behaviour is the same, only sooner.
"""

from __future__ import annotations

import pytest

from tests.faults.conftest import FAST_RECOVERY, spec_for, wait_status
from tests.test_service_e2e import upload_digits, wait_for


@pytest.mark.slow
def test_a_job_that_loses_every_worker_ends_failed_worker_lost(
    fresh_database, private_redis, make_stack, examples_dir
):
    stack = make_stack(fresh_database, private_redis.url, **FAST_RECOVERY)
    stack.start_api()
    for name in ("w0", "w1"):
        stack.start_worker(name)
    client = stack.client()
    train_id, val_id = upload_digits(client, examples_dir)
    spec = spec_for(train_id, val_id, epochs=200)  # far longer than the test
    spec["max_restarts"] = 1
    stack.wait_workers_listening()
    job = client.submit(spec).info

    for n in (1, 2):  # kill -9 whichever worker runs attempt n, with its training child
        rows = wait_for(lambda n=n: len(rows := stack.attempts(job["id"])) == n and rows, 120)
        worker = rows[-1][1].split(":")[0]
        wait_for(lambda worker=worker: stack.training_children(worker), timeout=60)
        stack.kill_worker(worker)

    final = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=60)
    assert final["status"] == "failed"
    assert final["error"].startswith("worker lost"), final["error"]
    assert "attempt 2 of 2" in final["error"]
    assert [outcome for _, _, outcome in stack.attempts(job["id"])] == ["lost", "lost"]
    assert list(client.jobs(status="running")) == []  # nothing stays running
