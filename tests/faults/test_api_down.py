"""The API killed (kill -9) mid-training and started again: the worker trains on.

The API is down 8 s here rather than 30 s, with a 5 s lease: longer than the
lease, so a lost report would cost the attempt, and the behaviour is the same.
The worker's in-memory buffer is cut to 100 points so it spills to disk.
"""

from __future__ import annotations

import time

import pytest
import torch

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

OUTAGE_S = 8
EPOCHS = 15  # long enough that the outage lands mid-run even when uploads lag on a loaded machine


@pytest.mark.slow
def test_training_goes_on_while_the_api_is_down_and_nothing_is_lost(
    fresh_database, private_redis, make_stack, examples_dir, tmp_path
):
    stack = make_stack(
        fresh_database, private_redis.url, **{**FAST_RECOVERY, "TORCHYARD_LEASE_S": "5"}
    )
    stack.start_api()
    stack.start_worker("w0", TORCHYARD_REPORT_BUFFER_POINTS="100")
    client = stack.client()
    train_id, val_id = upload_digits(client, examples_dir)
    # a point per step: the outage leaves far more than 100 points to buffer
    spec = spec_for(train_id, val_id, epochs=EPOCHS, log_every_n_steps=1)
    stack.wait_workers_listening()
    job = client.submit(spec).info
    run_dir = wait_for(lambda: list(stack.folder.glob("work-w0/jobs/*/attempt-1")), timeout=120)[0]
    wait_for(lambda: any(c["kind"] == "last" for c in checkpoints_of(stack, job["id"])), 120)

    stack.kill_api()
    down_at = time.monotonic()
    assert not (run_dir / "result.json").exists(), "the run ended before the outage"
    spill = run_dir / "spill"
    spilled = wait_for(lambda: list(spill.glob("*.json")), timeout=OUTAGE_S, every=0.05)
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
    stack.start_api()

    final = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", f"{final['error']}\n{stack.tail()}"
    assert final["attempt"] == 1  # the lease held: the same attempt trained through
    assert spilled and not list(spill.glob("*.json"))  # spilled to disk, then delivered
    assert "API unreachable, buffering reports" in stack.log("worker-w0")

    reference = reference_run(spec, examples_dir, tmp_path / "reference")
    assert without_timing(series_of(client, job["id"])) == reference.points  # no point lost
    files = assert_downloads_match_listing(stack, job["id"], tmp_path)
    assert {f"last-{e}" for e in range(EPOCHS)} <= set(files)  # every checkpoint arrived
    state = torch.load(files[f"last-{EPOCHS - 1}"], map_location="cpu", weights_only=True)
    assert_same_tensors(state["model"], reference.last_model)
