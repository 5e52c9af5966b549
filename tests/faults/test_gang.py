"""A job of several nodes on a gang of `torchyard worker` processes, on one machine.

Embedded mode (SQLite, the filesystem broker, a temp TORCHYARD_HOME). Two workers on
127.0.0.1 each claim the job; neither trains until both have, then each is handed
its node rank and node 0's endpoint, and their ranks meet through node 0's c10d
TCPStore (gloo). The run must be the very run of the same ranks on one node.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.conftest import FAST_RECOVERY, spec_for, wait_status
from tests.faults.test_data_parallel_worker import assert_matches, local_reference
from tests.faults.test_stop import attempts_of, rows
from tests.test_service_e2e import upload_digits, wait_for

EPOCHS = 8
ON_LOOPBACK = {"TORCHYARD_RENDEZVOUS_HOST": "127.0.0.1"}


def two_node_spec(train_id: str, val_id: str) -> dict:
    spec = spec_for(train_id, val_id, epochs=EPOCHS, log_every_n_steps=5)
    spec["resources"] = {"processes": 1, "nodes": 2}
    return spec


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
    for name in ("w0", "w1"):
        built.start_worker(name, **ON_LOOPBACK)
    client = built.client()
    train_id, val_id = upload_digits(client, examples_dir)
    spec = two_node_spec(train_id, val_id)
    built.wait_workers_listening()
    job_id = client.submit(spec).id

    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 400)
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
    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 400)
    assert final["status"] == "succeeded", f"{final['error']}\n{built.tail()}"
    assert attempts_of(tmp_path, job_id) == [(1, "succeeded")]
