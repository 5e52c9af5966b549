"""Checkpoint retention with real workers: a 20-epoch job with `save_top_k: 2` ends with
exactly 3 checkpoint files in the artifact store (the 2 best epochs, `best` sharing
its epoch's file, and the newest `last`), also when its worker was killed mid-run
(kill -9 of the worker and its training child) and the job resumed on another.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.conftest import (
    FAST_RECOVERY,
    Stack,
    assert_downloads_match_listing,
    checkpoints_of,
    spec_for,
    wait_status,
)
from tests.faults.test_worker_killed import _running_worker, _training_after_a_checkpoint
from tests.test_service_e2e import upload_digits

EPOCHS = 20


def _spec(train_id: str, val_id: str) -> dict:
    spec = spec_for(train_id, val_id, epochs=EPOCHS, log_every_n_steps=20)
    spec["callbacks"]["checkpoint"]["save_top_k"] = 2
    return spec


def _stored(stack: Stack, job_id: str) -> list[Path]:
    folder = stack.artifacts / "jobs" / job_id / "checkpoints"
    return sorted(folder.iterdir())


def _assert_three_files_kept(stack: Stack, job_id: str, final: dict, into: Path) -> None:
    assert final["status"] == "succeeded", f"{final['error']}\n{stack.tail()}"
    assert len(_stored(stack, job_id)) == 3, _stored(stack, job_id)
    assert_downloads_match_listing(stack, job_id, into)  # each listed file is on disk, intact
    listed = checkpoints_of(stack, job_id)
    ranked = sorted(c["epoch"] for c in listed if c["kind"] == "top_k")
    assert len(ranked) == 2
    assert [c["epoch"] for c in listed if c["kind"] == "last"] == [EPOCHS - 1]
    best = final["best"]["epoch"]
    assert [c["epoch"] for c in listed if c["kind"] == "best"] == [best] and best in ranked
    # the kept epochs are the two best by val_accuracy
    values = {c["epoch"]: c["value"] for c in listed if c["kind"] == "top_k"}
    assert min(values.values()) >= sorted(_val_accuracy(stack, job_id), reverse=True)[1]
    assert final["disk_bytes"] == sum(p.stat().st_size for p in _stored(stack, job_id))


def _val_accuracy(stack: Stack, job_id: str) -> list[float]:
    history = stack.get(f"/jobs/{job_id}/metrics", params={"names": "val_accuracy"}).json()
    return [p["value"] for p in history["val_accuracy"]]


@pytest.mark.slow
def test_twenty_epochs_with_save_top_k_2_end_with_three_files(
    fresh_database, private_redis, make_stack, examples_dir, tmp_path
):
    stack = make_stack(fresh_database, private_redis.url)
    stack.start_api()
    stack.start_worker("w0")
    client = stack.client()
    train_id, val_id = upload_digits(client, examples_dir)
    stack.wait_workers_listening()
    job = client.submit(_spec(train_id, val_id))
    final = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=600)
    _assert_three_files_kept(stack, job["id"], final, tmp_path)


@pytest.mark.slow
def test_three_files_also_after_the_worker_was_killed_and_the_job_resumed(
    fresh_database, private_redis, make_stack, examples_dir, tmp_path
):
    stack = make_stack(fresh_database, private_redis.url, **FAST_RECOVERY)
    stack.start_api()
    for name in ("w0", "w1"):
        stack.start_worker(name)
    client = stack.client()
    train_id, val_id = upload_digits(client, examples_dir)
    stack.wait_workers_listening()
    job = client.submit(_spec(train_id, val_id))

    victim = _running_worker(stack, job["id"])
    _training_after_a_checkpoint(stack, victim, job["id"])
    stack.kill_worker(victim)

    final = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=600)
    (_, first, outcome1), (_, second, outcome2) = stack.attempts(job["id"])
    assert (outcome1, outcome2) == ("lost", "succeeded")
    assert first.startswith(victim) and not second.startswith(victim)
    assert '/resume "HTTP/1.1 200 OK"' in stack.log(f"worker-{second.split(':')[0]}")
    _assert_three_files_kept(stack, job["id"], final, tmp_path)
