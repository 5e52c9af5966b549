"""Checkpoint retention over the worker protocol, against the real API on SQLite and Postgres:
a job keeps its `save_top_k` best checkpoints and its newest `last`, every listed
checkpoint's file is on disk and no other file is, at every step; what a crash leaves
is swept at the next start; disk use is reported per job and per user.

The uploads follow the engine's own decisions (`top_k_decision`, `is_improvement`)
on a made-up series of values; tests/faults/test_checkpoint_retention.py runs real
workers.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db import session_scope
from app.protocol import commit_checkpoint
from app.store import attempts
from tests.app.conftest import Attempt, Server, claim, job_spec, server_settings, submit, upload
from worker.engine.callbacks import is_improvement, top_k_decision

# val_loss of 20 epochs: improves, plateaus, gets worse, improves late
VALUES = [0.9, 0.7, 0.75, 0.5, 0.55, 0.6, 0.45, 0.8, 0.46, 0.7,
          0.5, 0.65, 0.44, 0.9, 0.47, 0.52, 0.6, 0.443, 0.7, 0.8]  # fmt: skip
HOUR = 3600


def weights(epoch: int) -> bytes:
    return f"weights of epoch {epoch};".encode() * 50


def state(epoch: int) -> bytes:
    return f"training state after epoch {epoch};".encode() * 80


def put(
    attempt: Attempt, kind: str, epoch: int, body: bytes, value: float | None = None
) -> httpx.Response:
    headers = {"X-Sha256": hashlib.sha256(body).hexdigest(), "X-Step": str(10 * (epoch + 1))}
    if value is not None:
        headers.update({"X-Monitor": "val_loss", "X-Value": repr(value)})
    response = attempt.client.put(
        f"/worker/jobs/{attempt.job_id}/checkpoints/{kind}/{epoch}", content=body, headers=headers
    )
    assert response.status_code == 201, response.text
    return response


def run_epochs(
    attempt: Attempt,
    values: list[float],
    k: int,
    after_epoch: Callable[[int], None] = lambda epoch: None,
) -> None:
    """Upload what the engine's ModelCheckpoint and save_last would, epoch by epoch."""
    kept: list[tuple[float, int]] = []
    best: float | None = None
    for epoch, value in enumerate(values):
        save, kept, _ = top_k_decision(kept, value, epoch, k=k, mode="min")
        if k > 1 and save:
            put(attempt, "top_k", epoch, weights(epoch), value)
        if is_improvement(value, best, "min"):
            best = value
            put(attempt, "best", epoch, weights(epoch), value)
        put(attempt, "last", epoch, state(epoch))
        after_epoch(epoch)


def files_of(server: Server, job_id: str) -> dict[str, bytes]:
    folder = server.settings.artifact_dir / "jobs" / job_id / "checkpoints"
    if not folder.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_listing_is_what_is_on_disk(server: Server, user: httpx.Client, job_id: str) -> list:
    """Every listed checkpoint downloads with its sha256, and no other file is stored."""
    listed = user.get(f"/jobs/{job_id}/checkpoints").json()
    served = set()
    for row in listed:
        body = user.get(f"/jobs/{job_id}/checkpoints/{row['id']}").content
        assert hashlib.sha256(body).hexdigest() == row["sha256"], row
        served.add(body)
    assert set(files_of(server, job_id).values()) == served
    return listed


def kept(listed: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {(row["kind"], row["epoch"]) for row in listed}


def test_twenty_epochs_with_save_top_k_2_end_with_three_files(server, user):
    dataset = upload(user)
    job = submit(
        user, job_spec(dataset["id"], training__epochs=20, callbacks__checkpoint={"save_top_k": 2})
    )
    attempt = claim(server, job["id"])

    def at_every_step(epoch: int) -> None:
        # the top 2 epochs so far and the newest last, nothing else
        assert len(files_of(server, job["id"])) == min(epoch + 1, 2) + 1
        assert_listing_is_what_is_on_disk(server, user, job["id"])

    run_epochs(attempt, VALUES, k=2, after_epoch=at_every_step)

    listed = assert_listing_is_what_is_on_disk(server, user, job["id"])
    assert len(files_of(server, job["id"])) == 3
    # the two lowest val_loss: epoch 12 (0.44, best: one file for both rows) and 17 (0.443)
    assert kept(listed) == {("top_k", 12), ("best", 12), ("top_k", 17), ("last", 19)}
    assert user.get(f"/jobs/{job['id']}/checkpoints/best").content == weights(12)
    assert attempt.client.get(f"/worker/jobs/{job['id']}/resume").content == state(19)
    shown = user.get(f"/jobs/{job['id']}").json()
    assert shown["disk_bytes"] == sum(len(b) for b in files_of(server, job["id"]).values())


def test_the_default_keeps_the_best_and_the_newest_last(server, user):
    dataset = upload(user)
    job = submit(user, job_spec(dataset["id"], training__epochs=20))
    attempt = claim(server, job["id"])
    run_epochs(attempt, VALUES, k=1)
    listed = assert_listing_is_what_is_on_disk(server, user, job["id"])
    assert kept(listed) == {("best", 12), ("last", 19)}
    assert len(files_of(server, job["id"])) == 2


def test_save_top_k_0_keeps_only_the_newest_last(server, user):
    dataset = upload(user)
    job = submit(user, job_spec(dataset["id"], callbacks__checkpoint={"save_top_k": 0}))
    attempt = claim(server, job["id"])
    for epoch in range(3):
        put(attempt, "last", epoch, state(epoch))
    assert kept(assert_listing_is_what_is_on_disk(server, user, job["id"])) == {("last", 2)}


def test_mode_max_keeps_the_highest_values(server, user):
    dataset = upload(user)
    spec = job_spec(dataset["id"], callbacks__checkpoint={"save_top_k": 2, "monitor": "accuracy"})
    job = submit(user, spec)
    attempt = claim(server, job["id"])
    for epoch, value in enumerate([0.5, 0.9, 0.7, 0.8]):
        body = weights(epoch)
        headers = {
            "X-Sha256": hashlib.sha256(body).hexdigest(),
            "X-Monitor": "accuracy",  # max by its name, as the engine's default
            "X-Value": str(value),
        }
        url = f"/worker/jobs/{job['id']}/checkpoints/top_k/{epoch}"
        assert attempt.client.put(url, content=body, headers=headers).status_code == 201
    listed = assert_listing_is_what_is_on_disk(server, user, job["id"])
    assert kept(listed) == {("top_k", 1), ("top_k", 3)}
    assert user.get(f"/jobs/{job['id']}/checkpoints/best").content == weights(1)


def test_a_late_retry_of_a_superseded_checkpoint_is_accepted_and_not_kept(server, user):
    dataset = upload(user)
    job = submit(user, job_spec(dataset["id"]))
    attempt = claim(server, job["id"])
    put(attempt, "last", 0, state(0))
    put(attempt, "last", 1, state(1))
    put(attempt, "last", 0, state(0))  # the answer to the first try was lost: a retry
    listed = assert_listing_is_what_is_on_disk(server, user, job["id"])
    assert kept(listed) == {("last", 1)}
    assert attempt.client.get(f"/worker/jobs/{job['id']}/resume").content == state(1)


def test_a_resumed_attempt_that_saves_an_epoch_again_replaces_its_file(server, user):
    dataset = upload(user)
    job = submit(user, job_spec(dataset["id"], callbacks__checkpoint={"save_top_k": 2}))
    attempt = claim(server, job["id"])
    put(attempt, "top_k", 0, weights(0), 0.5)
    put(attempt, "best", 0, weights(0), 0.5)
    put(attempt, "top_k", 0, b"other bytes of epoch 0" * 10, 0.5)  # another attempt's save
    listed = assert_listing_is_what_is_on_disk(server, user, job["id"])
    assert kept(listed) == {("top_k", 0), ("best", 0)}
    assert len(files_of(server, job["id"])) == 2


# ------------------------------------------------------------- crash and sweep


class Restarts:
    """Servers started one after another on one home (artifact root) and database."""

    def __init__(self, home: Path, database_url: str):
        self.home = home
        self.database_url = database_url
        self.current: Server | None = None

    def start(self, **settings: Any) -> Server:
        self.stop()
        self.current = Server(server_settings(self.home, self.database_url, **settings))
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture
def restarts(database_url, tmp_path):
    servers = Restarts(tmp_path / "home", database_url)
    yield servers
    servers.stop()


def commit_without_unlinking(server: Server, attempt: Attempt, kind: str, epoch: int, body: bytes):
    """The first half of a checkpoint upload, as the route runs it; then the process 'dies'
    before the second half (unlinking what the new row superseded) runs."""
    sessions, artifacts = server.app.state.sessions, server.app.state.artifacts
    with session_scope(sessions) as session:
        ref = attempts.resolve(session, attempt.claim["token"])
    assert ref is not None
    with artifacts.writing() as temp:
        temp.write(body)
        _, dropped = commit_checkpoint(
            sessions, artifacts, ref, temp, kind, epoch, 10 * (epoch + 1), None, None, 30
        )
    return dropped


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_files_left_by_a_crash_after_the_commit_are_swept_at_the_next_start(restarts):
    server = restarts.start()
    with server.new_user() as user:
        job = submit(user, job_spec(upload(user)["id"]))
    attempt = claim(server, job["id"])
    put(attempt, "last", 0, state(0))
    [dropped] = commit_without_unlinking(server, attempt, "last", 1, state(1))

    on_disk = files_of(server, job["id"])
    assert len(on_disk) == 2 and Path(dropped).name in on_disk  # the crash's leftover
    with server.new_user() as other:
        assert other.get(f"/jobs/{job['id']}").status_code == 404
    folder = server.settings.artifact_dir / "jobs" / job["id"] / "checkpoints"

    server = restarts.start()  # the default grace: a file this young may be mid-commit
    assert Path(dropped).name in files_of(server, job["id"])
    age(folder / Path(dropped).name, 2 * HOUR)
    server = restarts.start()
    assert list(files_of(server, job["id"]).values()) == [state(1)]
    resume = server.client(attempt.claim["token"]).get(f"/worker/jobs/{job['id']}/resume")
    assert resume.content == state(1)


def test_a_crash_before_the_commit_keeps_the_only_copy_and_sweeps_the_new_file(restarts):
    server = restarts.start()
    with server.new_user() as user:
        job = submit(user, job_spec(upload(user)["id"]))
    attempt = claim(server, job["id"])
    put(attempt, "last", 0, state(0))
    # The upload moved its file in; the process died before its row committed.
    artifacts = server.app.state.artifacts
    with artifacts.writing() as temp:
        temp.write(state(1))
        artifacts.commit(temp, f"jobs/{job['id']}/checkpoints/last-1-{temp.sha256[:16]}.pt")
    # and an export that was being written when it died
    folder = server.settings.artifact_dir / "jobs" / job["id"] / "checkpoints"
    (folder / ".best-0-0123456789abcdef.5f3c9a1b2c3d.tmp.pt2").write_bytes(b"half an export")
    for path in folder.iterdir():
        age(path, 2 * HOUR)

    server = restarts.start()
    assert list(files_of(server, job["id"]).values()) == [state(0)]  # the only copy, kept
    resume = server.client(attempt.claim["token"]).get(f"/worker/jobs/{job['id']}/resume")
    assert resume.content == state(0)


def test_the_sweep_removes_folders_of_deleted_datasets_and_reports_rows_without_files(
    restarts, caplog
):
    server = restarts.start()
    with server.new_user() as user:
        kept_dataset = upload(user)
        job = submit(user, job_spec(kept_dataset["id"]))
    attempt = claim(server, job["id"])
    put(attempt, "last", 0, state(0))
    root = server.settings.artifact_dir
    orphan = root / "datasets" / "0123456789abcdef0123"  # a crash after its row went
    orphan.mkdir(parents=True)
    (orphan / "data.npz").write_bytes(b"left behind")
    young = root / "datasets" / "0123456789abcdef0124"  # an upload still describing its file
    young.mkdir()
    (young / "data.npz").write_bytes(b"being described")
    for path in (orphan / "data.npz", orphan, *(root / "datasets" / kept_dataset["id"]).iterdir()):
        age(path, 2 * HOUR)
    for path in (root / "jobs" / job["id"] / "checkpoints").iterdir():
        path.unlink()  # lost outside the service

    server = restarts.start()
    assert not orphan.exists()
    assert young.exists()
    assert (root / "datasets" / kept_dataset["id"]).exists()
    # the row is the only trace of the lost file: reported, kept
    assert "name a file that is gone" in caplog.text
    with server.client(attempt.claim["token"]) as worker:
        assert worker.get(f"/worker/jobs/{job['id']}/resume").status_code == 404


def test_the_sweep_removes_nothing_with_a_database_that_is_not_the_roots(tmp_path):
    home = tmp_path / "home"
    first = Server(server_settings(home, f"sqlite:///{tmp_path / 'one.db'}"))
    with first.new_user() as user:
        dataset = upload(user)
    first.stop()
    stored = next((home / "artifacts" / "datasets" / dataset["id"]).iterdir())
    age(stored, 2 * HOUR)
    age(stored.parent, 2 * HOUR)
    # the same artifact root, pointed at a new, empty database by mistake
    second = Server(server_settings(home, f"sqlite:///{tmp_path / 'other.db'}"))
    second.stop()
    assert stored.exists()


# --------------------------------------------------------------- disk use


def test_usage_counts_the_callers_own_datasets_and_jobs_only(server):
    with server.new_user() as alice, server.new_user() as bob:
        a1, a2 = upload(alice), upload(alice, filename="more.npz")
        b1 = upload(bob)
        job = submit(alice, job_spec(a1["id"], callbacks__checkpoint={"save_top_k": 2}))
        submit(bob, job_spec(b1["id"]))
        attempt = claim(server, job["id"])
        run_epochs(attempt, VALUES[:5], k=2)

        stored = sum(len(b) for b in files_of(server, job["id"]).values())
        assert alice.get(f"/jobs/{job['id']}").json()["disk_bytes"] == stored
        assert bob.get(f"/jobs/{job['id']}").status_code == 404
        assert alice.get("/usage").json() == {
            "datasets": {"count": 2, "bytes": a1["size"] + a2["size"]},
            "jobs": {"count": 1, "bytes": stored},
            "total_bytes": a1["size"] + a2["size"] + stored,
        }
        assert bob.get("/usage").json() == {
            "datasets": {"count": 1, "bytes": b1["size"]},
            "jobs": {"count": 1, "bytes": 0},
            "total_bytes": b1["size"],
        }
    with server.client() as anonymous:
        assert anonymous.get("/usage").status_code == 401
