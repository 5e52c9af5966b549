"""A job of several nodes on a gang of `torchyard worker` processes, on one machine.

Embedded mode (SQLite, the filesystem broker, a temp TORCHYARD_HOME). Two workers on
127.0.0.1 each claim the job; neither trains until both have, then each is handed
its node rank and node 0's endpoint, and their ranks meet through node 0's c10d
TCPStore (gloo). The run must be the very run of the same ranks on one node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.faults.conftest import FAST_RECOVERY, checkpoints_of, spec_for, wait_status
from tests.faults.test_data_parallel_worker import assert_matches, local_reference
from tests.faults.test_stop import attempts_of, rows, wait_mid_training
from tests.test_service_e2e import upload_digits, wait_for
from torchyard import Client

EPOCHS = 8
ON_LOOPBACK = {"TORCHYARD_RENDEZVOUS_HOST": "127.0.0.1"}


def two_node_spec(train_id: str, val_id: str) -> dict:
    spec = spec_for(train_id, val_id, epochs=EPOCHS, log_every_n_steps=5)
    spec["resources"] = {"processes": 1, "nodes": 2}
    return spec


def submit_to_two_workers(built, examples_dir: Path) -> tuple[Client, dict, str]:
    """Workers w0 and w1 on 127.0.0.1, listening; a 2-node job submitted to them."""
    for name in ("w0", "w1"):
        built.start_worker(name, **ON_LOOPBACK)
    client = built.client()
    spec = two_node_spec(*upload_digits(client, examples_dir))
    built.wait_workers_listening()
    return client, spec, client.submit(spec).id


@pytest.fixture
def stack(make_stack, tmp_path: Path):
    def make(**settings: str):
        built = make_stack(f"sqlite:///{tmp_path / 'torchyard.db'}", "filesystem://", **settings)
        built.start_api()
        return built

    return make


@pytest.mark.slow
def test_two_workers_form_a_two_node_gang_that_trains_as_two_ranks_on_one_node(
    stack, examples_dir, tmp_path
):
    built = stack(**FAST_RECOVERY, TORCHYARD_GANG_WAIT_S="120")
    client, spec, job_id = submit_to_two_workers(built, examples_dir)

    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 200, built)
    assert final["status"] == "succeeded", f"{final['error']}\n{built.tail()}"
    assert attempts_of(tmp_path, job_id) == [(1, "succeeded")]
    members = rows(
        tmp_path, "SELECT member, worker FROM gang_members WHERE job_id = ? ORDER BY member", job_id
    )
    assert [m for m, _ in members] == [0, 1]
    assert {w.split(":")[0] for _, w in members} == {"w0", "w1"}  # one node each

    # The same global ranks on one node: `torchyard train` with processes 2.
    local = {**spec, "resources": {"processes": 2}}
    reference = local_reference(local, examples_dir, tmp_path / "reference")
    assert_matches(built, client, job_id, reference, tmp_path)


@pytest.mark.slow
def test_a_partial_gang_lets_its_claim_go_and_forms_when_a_second_worker_comes(
    stack, examples_dir, tmp_path
):
    built = stack(**FAST_RECOVERY, TORCHYARD_GANG_WAIT_S="3")
    built.start_worker("w0", **ON_LOOPBACK)
    client = built.client()
    train_id, val_id = upload_digits(client, examples_dir)
    built.wait_workers_listening()
    job_id = client.submit(two_node_spec(train_id, val_id)).id

    # Alone, w0 holds its claim for the wait and lets go; the job never starts.
    wait_for(lambda: "the gang did not gather" in built.log("worker-w0"), timeout=120)
    assert client.job(job_id).info["status"] == "queued"
    assert attempts_of(tmp_path, job_id) == []

    built.start_worker("w1", **ON_LOOPBACK)
    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 200, built)
    assert final["status"] == "succeeded", f"{final['error']}\n{built.tail()}"
    assert attempts_of(tmp_path, job_id) == [(1, "succeeded")]


@pytest.mark.slow
def test_a_killed_node_loses_the_attempt_at_once_and_the_job_resumes_on_a_fresh_gang(
    stack, examples_dir, tmp_path
):
    # a lease far longer than the test's wait: the loss is seen by node 0, not the lease
    built = stack(**{**FAST_RECOVERY, "TORCHYARD_LEASE_S": "600"}, TORCHYARD_GANG_WAIT_S="120")
    client, spec, job_id = submit_to_two_workers(built, examples_dir)
    wait_mid_training(lambda: checkpoints_of(built, job_id), client, job_id)

    gang = "SELECT member, worker FROM gang_members WHERE job_id = ? AND n = ? ORDER BY member"
    node1 = rows(tmp_path, gang, job_id, 1)[1][1].split(":")[0]
    survivor = ({"w0", "w1"} - {node1}).pop()
    since = time.monotonic()
    built.kill_worker(node1)  # kill -9 of the worker, its training child and its rank
    # node 0's rank loses its peer in the next collective, and node 0 reports the attempt lost
    wait_for(lambda: attempts_of(tmp_path, job_id) == [(1, "lost")], timeout=60, every=0.1)
    assert time.monotonic() - since < 30
    reasons = [
        json.loads(data).get("reason")
        for (data,) in rows(
            tmp_path, "SELECT data FROM job_events WHERE job_id = ? AND kind = 'status'", job_id
        )
    ]
    assert any(r and r.startswith("lost a rank of the run") for r in reasons), reasons

    built.start_worker("w2", **ON_LOOPBACK)  # the gang of attempt 2: the survivor and w2
    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 200, built)
    assert final["status"] == "succeeded", f"{final['error']}\n{built.tail()}"
    assert attempts_of(tmp_path, job_id) == [(1, "lost"), (2, "succeeded")]
    workers = {w.split(":")[0] for _, w in rows(tmp_path, gang, job_id, 2)}
    assert workers == {survivor, "w2"}
    # both nodes of attempt 2 started from the checkpoint attempt 1 uploaded
    for name in workers:
        assert '/resume "HTTP/1.1 200 OK"' in built.log(f"worker-{name}"), name
    # and the run is the uninterrupted one, bit for bit
    local = {**spec, "resources": {"processes": 2}}
    reference = local_reference(local, examples_dir, tmp_path / "reference")
    assert_matches(built, client, job_id, reference, tmp_path)


@pytest.mark.slow
def test_a_node_whose_own_ranks_fail_fails_the_job_with_its_reason_rather_than_restarting(
    stack, examples_dir, tmp_path
):
    # a lease far longer than the test's wait: the failure is reported by node 1 itself
    built = stack(**{**FAST_RECOVERY, "TORCHYARD_LEASE_S": "600"}, TORCHYARD_GANG_WAIT_S="120")
    built.start_worker("w0", **ON_LOOPBACK)
    client = built.client()
    train = client.datasets.upload(examples_dir / "data" / "digits_train.npz")
    val = client.datasets.upload(examples_dir / "data" / "digits_val.npz")
    built.wait_workers_listening()
    job_id = client.submit(two_node_spec(train["id"], val["id"])).id
    gang = "SELECT member, worker FROM gang_members WHERE job_id = ? ORDER BY member"
    wait_for(lambda: [m for m, _ in rows(tmp_path, gang, job_id)] == [0], timeout=60)

    # w1, node 1, holds a damaged copy of the training file in its dataset cache (a
    # bad disk, a copy cut short): its ranks fail reading it; node 0's read it fine
    # and only see their peer gone.
    cache = built.folder / "work-w1" / "datasets"
    cache.mkdir(parents=True)
    (cache / f"{train['sha256']}.npz").write_bytes(b"PK\x03\x04 cut short")
    built.start_worker("w1", **ON_LOOPBACK)

    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 200, built)
    assert final["status"] == "failed", built.tail()
    assert final["error"].startswith("node 1: "), final["error"]
    # named as the user knows it (the upload's name and id), not by the cache's sha256
    named = f"digits_train.npz (dataset {train['id']}): not a valid NPZ file"
    assert named in final["error"], final["error"]
    # failed once, with node 1's reason: not restarted into the same failure
    assert attempts_of(tmp_path, job_id) == [(1, "failed")]
    assert [w.split(":")[0] for _, w in rows(tmp_path, gang, job_id)] == ["w0", "w1"]
