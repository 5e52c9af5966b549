"""Workers killed for real: kill -9 of the worker and its training child mid-epoch.

The lease is 3 s here instead of the default 30 s (TORCHYARD_LEASE_S): expiry,
requeue and resume behave the same, only sooner.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.faults.conftest import (
    FAST_RECOVERY,
    assert_downloads_match_listing,
    assert_same_tensors,
    checkpoints_of,
    reference_run,
    series_of,
    spec_for,
    wait_status,
    without_timing,
)
from tests.test_service_e2e import upload_digits, wait_for

EPOCHS = 12  # long enough that a checkpoint reaches the API before the run ends, even loaded


def _running_worker(stack, job_id: str) -> str:
    """The name of the worker running the job's current attempt."""
    rows = wait_for(lambda: stack.attempts(job_id), timeout=120)
    return rows[-1][1].split(":")[0]


def _run_dir(stack, worker: str, job_id: str) -> Path:
    return stack.folder / f"work-{worker}" / "jobs" / job_id / "attempt-1"


def _training_after_a_checkpoint(stack, worker: str, job_id: str) -> None:
    """Wait until the API holds a `last` checkpoint and the training child is still at it.

    Uploads trail the training a little, so by then the child is inside a later
    epoch; saving a checkpoint takes milliseconds of an epoch, so that is mid-epoch.
    """

    def training_on() -> bool:
        if (_run_dir(stack, worker, job_id) / "result.json").exists():
            raise AssertionError("the run ended before it could be interrupted")
        return any(c["kind"] == "last" for c in checkpoints_of(stack, job_id))

    wait_for(training_on, timeout=180, every=0.05)


@pytest.mark.slow
def test_resume_after_worker_killed_matches_uninterrupted_run(
    fresh_database, private_redis, make_stack, examples_dir, tmp_path
):
    stack = make_stack(fresh_database, private_redis.url, **FAST_RECOVERY)
    stack.start_api()
    for name in ("w0", "w1"):
        stack.start_worker(name)
    client = stack.client()
    train_id, val_id = upload_digits(client, examples_dir)
    spec = spec_for(train_id, val_id, epochs=EPOCHS, log_every_n_steps=5)
    stack.wait_workers_listening()
    job = client.submit(spec).info

    victim = _running_worker(stack, job["id"])
    _training_after_a_checkpoint(stack, victim, job["id"])
    stack.kill_worker(victim)
    assert not (_run_dir(stack, victim, job["id"]) / "result.json").exists()

    final = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", f"{final['error']}\n{stack.tail()}"
    attempts = stack.attempts(job["id"])
    assert final["attempt"] == 2, attempts
    (_, first, outcome1), (_, second, outcome2) = attempts
    assert (outcome1, outcome2) == ("lost", "succeeded")
    assert first.startswith(victim) and not second.startswith(victim)
    # attempt 2 started from the checkpoint attempt 1 uploaded, not from scratch
    assert '/resume "HTTP/1.1 200 OK"' in stack.log(f"worker-{second.split(':')[0]}")

    reference = reference_run(spec, examples_dir, tmp_path / "reference")
    points = series_of(client, job["id"])  # exactly one point per (name, step)
    assert without_timing(points) == reference.points  # nothing missing, nothing extra

    files = assert_downloads_match_listing(stack, job["id"], tmp_path)
    state = torch.load(files[f"last-{EPOCHS - 1}"], map_location="cpu", weights_only=True)
    assert_same_tensors(state["model"], reference.last_model)
    best = client.job(job["id"]).download(tmp_path / "best.safetensors")
    assert_same_tensors(load_file(str(best)), reference.best_model)


@pytest.mark.slow
def test_a_worker_back_from_the_dead_is_stale_and_stops(
    fresh_database, private_redis, make_stack, examples_dir
):
    """A worker frozen past its lease (SIGSTOP: a paused VM, a partition) wakes to 409."""
    stack = make_stack(fresh_database, private_redis.url, **FAST_RECOVERY)
    stack.start_api()
    for name in ("w0", "w1"):
        stack.start_worker(name)
    client = stack.client()
    train_id, val_id = upload_digits(client, examples_dir)
    stack.wait_workers_listening()
    job = client.submit(spec_for(train_id, val_id, epochs=EPOCHS, log_every_n_steps=5)).info

    sleeper = _running_worker(stack, job["id"])
    _training_after_a_checkpoint(stack, sleeper, job["id"])
    stack.signal_worker(sleeper, signal.SIGSTOP)
    wait_for(lambda: len(stack.attempts(job["id"])) == 2, timeout=60)  # another took over
    stack.signal_worker(sleeper, signal.SIGCONT)

    # Its next report is refused as stale: it ends its training child and drops the job.
    wait_for(lambda: "this attempt is stale" in stack.log(f"worker-{sleeper}"), timeout=60)
    wait_for(lambda: not stack.training_children(sleeper), timeout=30)
    final = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", f"{final['error']}\n{stack.tail()}"
    (_, first, outcome1), (_, second, outcome2) = stack.attempts(job["id"])
    assert first.startswith(sleeper) and not second.startswith(sleeper)
    assert (outcome1, outcome2) == ("lost", "succeeded")
    series_of(client, job["id"])  # still exactly one point per (name, step)
