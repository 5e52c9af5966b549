"""The worker's Uploader against the real API: how the training child's reports are sent."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

from app.db import session_scope
from app.store import events
from tests.app.conftest import claim, points
from worker.client import WorkerClient
from worker.uploader import Uploader


def metrics_events(server, job_id: str) -> int:
    with session_scope(server.app.state.sessions) as session:
        return sum(e.kind == "metrics" for e in events.after(session, job_id, 0, 10_000))


def stored_steps(user, job_id: str) -> list[int]:
    return [p["step"] for p in user.get(f"/jobs/{job_id}/metrics").json().get("loss", [])]


def uploader_for(server, job_id: str, tmp_path: Path, hold_s: float):
    attempt = claim(server, job_id)
    client = WorkerClient(server.url, attempt.claim["token"])
    inbox: queue.Queue = queue.Queue()
    uploader = Uploader(
        client,
        job_id,
        inbox,
        threading.Event(),
        spill_dir=tmp_path / "spill",
        lease_s=30,
        hold_s=hold_s,
    )
    return uploader, inbox, client


def test_reports_of_several_log_steps_go_as_one_batch_after_the_hold(
    server, user, queued_job, tmp_path
):
    job_id = queued_job["id"]
    uploader, inbox, client = uploader_for(server, job_id, tmp_path, hold_s=0.6)
    before = metrics_events(server, job_id)
    held_since = time.monotonic()
    for step in range(5):  # five log steps, as the child reports them
        inbox.put(("metrics", points(float(step), start=step)))
        uploader.drain()
        uploader.pump()
    if time.monotonic() - held_since < 0.5:  # (a loaded machine may take longer than the hold)
        assert stored_steps(user, job_id) == []  # held for more points
    time.sleep(0.7)
    uploader.pump()
    assert stored_steps(user, job_id) == [0, 1, 2, 3, 4]
    assert metrics_events(server, job_id) == before + 1  # one request, one event
    assert uploader.idle
    client.close()


def test_a_held_batch_goes_at_once_at_the_end_or_before_a_later_report(
    server, user, queued_job, tmp_path
):
    job_id = queued_job["id"]
    uploader, inbox, client = uploader_for(server, job_id, tmp_path, hold_s=60)
    inbox.put(("metrics", points(1.0, 2.0)))
    uploader.drain()
    uploader.pump()
    assert stored_steps(user, job_id) == []
    uploader.pump(flush=True)  # the run is over: nothing waits
    assert stored_steps(user, job_id) == [0, 1]

    inbox.put(("metrics", points(3.0, start=2)))
    inbox.put(("log", ["epoch 0 of 1: loss 3"]))  # a later report: the batch goes first
    uploader.drain()
    uploader.pump()
    assert stored_steps(user, job_id) == [0, 1, 2]
    assert user.get(f"/jobs/{job_id}/logs").json()["lines"] == ["epoch 0 of 1: loss 3"]
    assert uploader.idle
    client.close()


def test_progress_goes_at_most_once_a_second_but_the_last_always_goes_at_the_end(
    server, user, queued_job, tmp_path
):
    job_id = queued_job["id"]
    uploader, inbox, client = uploader_for(server, job_id, tmp_path, hold_s=0.0)

    def progress() -> dict:
        return user.get(f"/jobs/{job_id}").json()["progress"]

    inbox.put(("progress", {"epoch": 1, "epochs": 3, "step": 45}))
    uploader.drain()
    uploader.pump()
    sent_at = time.monotonic()
    assert progress()["step"] == 45
    # the run ends within the second: a pump is too soon for a heartbeat...
    inbox.put(("progress", {"epoch": 3, "epochs": 3, "step": 135}))
    uploader.drain()
    uploader.pump()
    if time.monotonic() - sent_at < 0.9:  # (a loaded machine may take longer)
        assert progress()["step"] == 45
    # ...but the flush at the end delivers the run's last progress
    uploader.pump(flush=True)
    assert progress()["step"] == 135 and progress()["epochs"] == 3
    client.close()
