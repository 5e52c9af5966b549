"""A data-parallel job (`resources.processes: 2`) on one `torchyard worker`, for real.

Embedded mode (SQLite, the filesystem broker, a temp TORCHYARD_HOME): the API and the
workers are separate processes, the worker's training child is the ranks' elastic
agent, and the ranks are its children. The job must run to the same numbers as
`torchyard train` of the same spec (2 ranks, uninterrupted), however the worker dies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.faults.conftest import (
    FAST_RECOVERY,
    ROOT,
    TIMING_METRICS,
    Reference,
    assert_same_tensors,
    checkpoints_of,
    series_of,
    spec_for,
    wait_status,
    without_timing,
)
from tests.faults.test_stop import (
    NO_RESCUE,
    assert_all_gone_within,
    attempts_of,
    cmdline,
    descendants,
    job_row,
    rows,
    training_processes,
    wait_mid_training,
)
from tests.test_service_e2e import upload_digits, wait_for

EPOCHS = 8
RANKS = 2


def data_parallel_spec(train_id: str, val_id: str) -> dict[str, Any]:
    spec = spec_for(train_id, val_id, epochs=EPOCHS, log_every_n_steps=5)
    spec["resources"] = {"processes": RANKS}
    return spec


def newest_state(home: Path, job_id: str, artifacts: Path) -> dict[str, Any]:
    """The training state a resumed attempt would download (`last`, highest epoch and step)."""
    (path,) = rows(
        home,
        "SELECT path FROM checkpoints WHERE job_id = ? AND kind = 'last' "
        "ORDER BY epoch DESC, step DESC LIMIT 1",
        job_id,
    )[0]
    return torch.load(artifacts / path, map_location="cpu", weights_only=True)


@pytest.fixture
def stack(make_stack, tmp_path: Path):
    def make(**settings: str):
        built = make_stack(f"sqlite:///{tmp_path / 'torchyard.db'}", "filesystem://", **settings)
        built.start_api()
        return built

    return make


_references: dict[str, Reference] = {}


def local_reference(spec: dict[str, Any], examples_dir: Path, folder: Path) -> Reference:
    """The same spec trained uninterrupted by `torchyard train` (2 ranks, the elastic agent);
    once a test process for each spec (the service's dataset ids aside), as several tests
    compare with the same run."""
    local = json.loads(json.dumps(spec))
    local["data"].update(
        train=str(examples_dir / "data" / "digits_train.npz"),
        validation=str(examples_dir / "data" / "digits_val.npz"),
    )
    key = json.dumps(local, sort_keys=True)
    if key not in _references:
        _references[key] = _train_reference(local, folder)
    return _references[key]


def _train_reference(local: dict[str, Any], folder: Path) -> Reference:
    folder.mkdir()
    (folder / "spec.json").write_text(json.dumps(local))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "app.cli", "train", str(folder / "spec.json")]
    argv += ["--out", str(folder / "run"), "--quiet"]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    run = folder / "run"
    points = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        point = json.loads(line)
        if point["name"] not in TIMING_METRICS:
            points[(point["name"], point["step"])] = point["value"]
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    return Reference(points, state["model"], load_file(str(run / "best.safetensors")))


def assert_matches(stack, client, job_id: str, reference: Reference, tmp_path: Path) -> None:
    points = series_of(client, job_id)  # exactly one point per (name, step)
    assert without_timing(points) == reference.points  # nothing missing, nothing extra
    listed = {(c["kind"], c["epoch"]): c for c in checkpoints_of(stack, job_id)}
    last = stack.get(f"/jobs/{job_id}/checkpoints/{listed[('last', EPOCHS - 1)]['id']}")
    (tmp_path / "last.pt").write_bytes(last.content)
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert_same_tensors(state["model"], reference.last_model)
    assert state["world_size"] == RANKS and len(state["rng"]) == RANKS  # every rank's stream
    best = client.job(job_id).download(tmp_path / "best.safetensors")
    assert_same_tensors(load_file(str(best)), reference.best_model)


def rank_processes(worker_pid: int) -> set[int]:
    """The ranks: spawned by the training child (the agent), itself spawned by the worker."""
    agents = {p for p in descendants(worker_pid) if "multiprocessing.spawn" in cmdline(p)}
    return {
        p for agent in agents for p in descendants(agent) if "multiprocessing.spawn" in cmdline(p)
    }


@pytest.mark.slow
def test_a_two_process_job_on_one_worker_matches_torchyard_train(stack, examples_dir, tmp_path):
    built = stack(**NO_RESCUE)
    built.start_worker("w0")
    client = built.client()
    train_id, val_id = upload_digits(client, examples_dir)
    spec = data_parallel_spec(train_id, val_id)
    built.wait_workers_listening()
    job_id = client.submit(spec).id

    worker = built.workers["w0"]
    wait_for(lambda: len(rank_processes(worker.pid)) == RANKS, timeout=240, every=0.1)
    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 200, built)
    assert final["status"] == "succeeded", f"{final['error']}\n{built.tail()}"
    assert attempts_of(tmp_path, job_id) == [(1, "succeeded")]
    reference = local_reference(spec, examples_dir, tmp_path / "reference")
    assert_matches(built, client, job_id, reference, tmp_path)


@pytest.mark.slow
@pytest.mark.exclusive  # asserts a stop within STOP_WITHIN_S
def test_a_sigkilled_worker_leaves_no_rank_behind_and_the_next_worker_finishes_the_job(
    stack, examples_dir, tmp_path
):
    built = stack(**FAST_RECOVERY)
    built.start_worker("w0")
    client = built.client()
    train_id, val_id = upload_digits(client, examples_dir)
    spec = data_parallel_spec(train_id, val_id)
    built.wait_workers_listening()
    job_id = client.submit(spec).id
    wait_mid_training(lambda: checkpoints_of(built, job_id), client, job_id)

    worker = built.workers["w0"]
    ranks = rank_processes(worker.pid)
    assert len(ranks) == RANKS, [(p, cmdline(p)) for p in descendants(worker.pid)]
    training = training_processes(worker.pid)
    since = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)  # the worker's process alone: nothing else is told
    worker.wait()
    assert_all_gone_within(training | ranks, since)

    built.start_worker("w1")
    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 200, built)
    assert final["status"] == "succeeded", f"{final['error']}\n{built.tail()}"
    assert attempts_of(tmp_path, job_id) == [(1, "lost"), (2, "succeeded")]
    # attempt 2 started from the checkpoint attempt 1 uploaded, not from scratch
    assert '/resume "HTTP/1.1 200 OK"' in built.log("worker-w1")
    reference = local_reference(spec, examples_dir, tmp_path / "reference")
    assert_matches(built, client, job_id, reference, tmp_path)


@pytest.mark.slow
@pytest.mark.exclusive  # asserts a stop within STOP_WITHIN_S
def test_a_sigtermed_worker_preempts_its_ranks_mid_epoch_and_the_next_worker_finishes(
    stack, examples_dir, tmp_path
):
    built = stack(**NO_RESCUE)
    built.start_worker("w0")
    client = built.client()
    train_id, val_id = upload_digits(client, examples_dir)
    spec = data_parallel_spec(train_id, val_id)
    built.wait_workers_listening()
    job_id = client.submit(spec).id
    wait_mid_training(lambda: checkpoints_of(built, job_id), client, job_id)

    worker = built.workers["w0"]
    tree = descendants(worker.pid)
    assert len(rank_processes(worker.pid)) == RANKS
    since = time.monotonic()
    worker.send_signal(signal.SIGTERM)  # what `docker stop` sends
    assert_all_gone_within(tree | {worker.pid}, since, pgid=worker.pid)
    assert worker.wait() == 0

    assert job_row(tmp_path, job_id) == ("queued", 2)
    assert attempts_of(tmp_path, job_id) == [(1, "released")]
    state = newest_state(tmp_path, job_id, built.artifacts)
    # A preemption checkpoint (an epoch's own last.pt has no position); its batch may be 0
    # when the ranks' agreement fell on an epoch's end.
    assert state["position"] is not None

    built.start_worker("w1")
    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 200, built)
    assert final["status"] == "succeeded", f"{final['error']}\n{built.tail()}"
    assert attempts_of(tmp_path, job_id) == [(1, "released"), (2, "succeeded")]
    reference = local_reference(spec, examples_dir, tmp_path / "reference")
    assert_matches(built, client, job_id, reference, tmp_path)


@pytest.mark.slow
def test_a_cancelled_two_process_job_ends_cancelled_with_no_rank_left(stack, examples_dir):
    """The cancel flag reaches rank 0 alone; the ranks agree on the stop at the next window."""
    built = stack(**NO_RESCUE)
    built.start_worker("w0")
    client = built.client()
    train_id, val_id = upload_digits(client, examples_dir)
    built.wait_workers_listening()
    job_id = client.submit(data_parallel_spec(train_id, val_id)).id
    wait_mid_training(lambda: checkpoints_of(built, job_id), client, job_id)

    worker = built.workers["w0"]
    ranks = rank_processes(worker.pid)
    assert len(ranks) == RANKS
    client.job(job_id).cancel()
    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 120)
    assert final["status"] == "cancelled", f"{final['error']}\n{built.tail()}"
    wait_for(lambda: not ranks & descendants(worker.pid), timeout=30)
    assert worker.poll() is None  # the worker lives on for the next job
    series_of(client, job_id)  # one point per (name, step)
