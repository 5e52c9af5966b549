"""Stopping `serve` and `torchyard worker` mid-job, for real: Ctrl-C, SIGTERM, SIGKILL.

Embedded mode throughout (SQLite, the filesystem broker, a temp TORCHYARD_HOME),
so nothing is shared with other tests. A stop must leave no process behind
within 5 s (a training child reporting to nobody kept a GPU busy before), must
not fail the job, and the next start must finish it exactly: one point per
(name, step), weights bit-identical to an uninterrupted run.

Leases and re-sends are set far out (600 s) where a stop is graceful: the job is
back in the queue because the worker released it, not because a lease ran out.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.faults.conftest import (
    FAST_RECOVERY,
    ROOT,
    assert_same_tensors,
    checkpoints_of,
    kill_group,
    reference_run,
    series_of,
    spec_for,
    start,
    wait_status,
    without_timing,
)
from tests.test_service_e2e import free_port, upload_digits, wait_for
from torchyard import Client

EPOCHS = 12
STOP_WITHIN_S = 5.0
NO_RESCUE = {"TORCHYARD_LEASE_S": "600", "TORCHYARD_REQUEUE_AFTER_S": "600"}


# ------------------------------------------------------------- processes


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live process (zombies are dead: they only wait to be reaped)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            out[int(entry.name)] = int(ppid)
    return out


def descendants(pid: int) -> set[int]:
    parents = _parents()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return pids & set(_parents())


def in_group(pgid: int) -> set[int]:
    live = set()
    for pid in _parents():
        try:
            if os.getpgid(pid) == pgid:
                live.add(pid)
        except ProcessLookupError:
            pass
    return live


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "(gone)"


def training_processes(root: int) -> set[int]:
    """The training child under `root` and everything it started (its DataLoader workers)."""
    tree = descendants(root)
    children = {pid for pid in tree if "multiprocessing.spawn" in cmdline(pid)}
    return children | {pid for child in children for pid in descendants(child)}


def assert_all_gone_within(pids: set[int], since: float, pgid: int | None = None) -> None:
    """Every process in `pids` (and of group `pgid`) ends within STOP_WITHIN_S of `since`."""
    deadline = since + STOP_WITHIN_S
    while True:
        left = alive(pids) | (in_group(pgid) if pgid is not None else set())
        if not left:
            return
        if time.monotonic() > deadline:
            shown = "\n".join(f"  {pid}: {cmdline(pid)}" for pid in sorted(left))
            raise AssertionError(f"still running {STOP_WITHIN_S:g} s after the stop:\n{shown}")
        time.sleep(0.05)


# -------------------------------------------------------------- database


def rows(home: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(home / "torchyard.db") as conn:
        return list(conn.execute(query, params))


def attempts_of(home: Path, job_id: str) -> list[tuple[int, str | None]]:
    return rows(home, "SELECT n, outcome FROM attempts WHERE job_id = ? ORDER BY n", job_id)


def job_row(home: Path, job_id: str) -> tuple[str, int]:
    return rows(home, "SELECT status, attempt FROM jobs WHERE id = ?", job_id)[0]


def newest_state(home: Path, job_id: str) -> dict[str, Any]:
    """The training state a resumed attempt would download (`last`, highest epoch and step)."""
    (path,) = rows(
        home,
        "SELECT path FROM checkpoints WHERE job_id = ? AND kind = 'last' "
        "ORDER BY epoch DESC, step DESC LIMIT 1",
        job_id,
    )[0]
    return torch.load(home / "artifacts" / path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------ jobs


def wait_mid_training(get_checkpoints: Any, client: Client, job_id: str) -> None:
    """Until the API holds a `last` checkpoint and the job is still running: mid-run."""

    def training_on() -> bool:
        if client.job(job_id).status in ("succeeded", "failed", "cancelled"):
            raise AssertionError("the job ended before it could be stopped")
        return any(c["kind"] == "last" for c in get_checkpoints())

    wait_for(training_on, timeout=240, every=0.1)


def assert_matches_uninterrupted_run(
    client: Client, job_id: str, spec: dict, examples_dir: Path, tmp_path: Path, get: Any
) -> None:
    reference = reference_run(spec, examples_dir, tmp_path / "reference")
    points = series_of(client, job_id)  # exactly one point per (name, step)
    assert without_timing(points) == reference.points
    listed = {(c["kind"], c["epoch"]): c for c in get(f"/jobs/{job_id}/checkpoints").json()}
    last = get(f"/jobs/{job_id}/checkpoints/{listed[('last', EPOCHS - 1)]['id']}")
    (tmp_path / "last.pt").write_bytes(last.content)
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert_same_tensors(state["model"], reference.last_model)
    best = client.job(job_id).download(tmp_path / "best.safetensors")
    assert_same_tensors(load_file(str(best)), reference.best_model)


# ----------------------------------------------------------------- serve


class Serve:
    """`torchyard serve` in a process group of its own, as a terminal runs it."""

    def __init__(self, home: Path, folder: Path):
        self.home, self.folder = home, folder
        self.port = free_port()
        self.token = "stop-test-token-0123456789"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        for key in ("TORCHYARD_DATABASE_URL", "TORCHYARD_BROKER_URL", "TORCHYARD_API_URL"):
            env.pop(key, None)
        env.update(TORCHYARD_HOME=str(self.home), TORCHYARD_TOKEN=self.token, **NO_RESCUE)
        argv = [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)]
        self.log = self.folder / log
        self.proc = start(argv, env, self.log)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited:\n{self.log.read_text()[-3000:]}")
            try:
                up = httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
            # serve says so once its worker takes jobs (Celery's own lines go to its log file)
            return up and "worker ready" in self.log.read_text(errors="replace")

        wait_for(ready, timeout=180, every=0.2)

    def client(self) -> Client:
        return Client(self.url, self.token)

    def get(self, path: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.get(f"{self.url}/api/v1{path}", headers=headers, timeout=30)

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc.wait()


@pytest.fixture
def serves(tmp_path: Path):
    started: list[Serve] = []
    home = tmp_path / "home"

    def make() -> Serve:
        serve = Serve(home, tmp_path)
        started.append(serve)
        return serve

    yield make
    for serve in started:
        serve.kill()


@pytest.mark.slow
@pytest.mark.exclusive  # asserts a stop within STOP_WITHIN_S
def test_ctrl_c_of_serve_mid_job_leaves_no_process_and_the_next_serve_finishes_the_job(
    serves, examples_dir, tmp_path
):
    first = serves()
    first.start("serve-1.log")
    client = first.client()
    train_id, val_id = upload_digits(client, examples_dir)
    # Streamed through DataLoader workers: grandchildren of the worker, gone all the same.
    spec = spec_for(train_id, val_id, epochs=EPOCHS, log_every_n_steps=5)
    spec["data"].update(in_memory="never", num_workers=2)
    job_id = client.submit(spec).id
    wait_mid_training(lambda: checkpoints_of(first, job_id), client, job_id)

    assert first.proc is not None
    tree = descendants(first.proc.pid)
    training = training_processes(first.proc.pid)
    assert len(training) >= 3, "expected a training child and its 2 DataLoader workers"
    since = time.monotonic()
    os.killpg(first.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
    assert_all_gone_within(tree | {first.proc.pid}, since, pgid=first.proc.pid)
    first.proc.wait()

    # Not failed, not left to a lease: queued at once, with a mid-epoch state to resume.
    assert job_row(first.home, job_id) == ("queued", 2)
    assert attempts_of(first.home, job_id) == [(1, "released")]
    state = newest_state(first.home, job_id)
    assert state["position"] is not None and state["position"]["batch"] > 0

    second = serves()
    second.start("serve-2.log")
    final = wait_status(second.client(), job_id, {"succeeded", "failed", "cancelled"}, 300)
    assert final["status"] == "succeeded", final["error"]
    assert attempts_of(second.home, job_id) == [(1, "released"), (2, "succeeded")]
    assert_matches_uninterrupted_run(
        second.client(), job_id, spec, examples_dir, tmp_path, second.get
    )


# ---------------------------------------------------------------- worker


@pytest.fixture
def embedded_stack(make_stack, tmp_path: Path):
    """The API and workers as separate processes on SQLite and the filesystem broker."""

    def make(**settings: str):
        stack = make_stack(f"sqlite:///{tmp_path / 'torchyard.db'}", "filesystem://", **settings)
        stack.start_api()
        return stack

    return make


@pytest.mark.slow
@pytest.mark.exclusive  # asserts a stop within STOP_WITHIN_S
def test_a_sigtermed_worker_hands_its_job_back_and_the_next_worker_finishes_it(
    embedded_stack, examples_dir, tmp_path
):
    stack = embedded_stack(**NO_RESCUE)
    stack.start_worker("w0")
    client = stack.client()
    train_id, val_id = upload_digits(client, examples_dir)
    spec = spec_for(train_id, val_id, epochs=EPOCHS, log_every_n_steps=5)
    stack.wait_workers_listening()
    job_id = client.submit(spec).id
    wait_mid_training(lambda: checkpoints_of(stack, job_id), client, job_id)

    worker = stack.workers["w0"]
    tree = descendants(worker.pid)
    assert training_processes(worker.pid)
    since = time.monotonic()
    worker.send_signal(signal.SIGTERM)  # what `docker stop` sends the container's process
    assert_all_gone_within(tree | {worker.pid}, since, pgid=worker.pid)
    assert worker.wait() == 0

    assert job_row(tmp_path, job_id) == ("queued", 2)
    assert attempts_of(tmp_path, job_id) == [(1, "released")]
    assert "released (worker stopping (SIGTERM))" in stack.log("worker-w0")

    stack.start_worker("w1")
    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 300)
    assert final["status"] == "succeeded", f"{final['error']}\n{stack.tail()}"
    assert attempts_of(tmp_path, job_id) == [(1, "released"), (2, "succeeded")]
    assert_matches_uninterrupted_run(client, job_id, spec, examples_dir, tmp_path, stack.get)


@pytest.mark.slow
@pytest.mark.exclusive  # asserts a stop within STOP_WITHIN_S
def test_a_sigkilled_worker_leaves_no_orphan_and_the_next_worker_finishes_its_job(
    embedded_stack, examples_dir, tmp_path
):
    stack = embedded_stack(**FAST_RECOVERY)
    stack.start_worker("w0")
    client = stack.client()
    train_id, val_id = upload_digits(client, examples_dir)
    stack.wait_workers_listening()
    job_id = client.submit(spec_for(train_id, val_id, epochs=EPOCHS, log_every_n_steps=5)).id
    wait_mid_training(lambda: checkpoints_of(stack, job_id), client, job_id)

    worker = stack.workers["w0"]
    training = training_processes(worker.pid)
    assert training, [(p, cmdline(p)) for p in descendants(worker.pid)]
    since = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)  # the worker's process alone: nothing else is told
    worker.wait()
    assert_all_gone_within(training, since)

    stack.start_worker("w1")
    final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 300)
    assert final["status"] == "succeeded", f"{final['error']}\n{stack.tail()}"
    assert attempts_of(tmp_path, job_id) == [(1, "lost"), (2, "succeeded")]
    series_of(client, job_id)  # one point per (name, step)
