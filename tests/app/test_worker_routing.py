"""Which worker takes which job, with a real API, the filesystem broker and real workers.

A CPU-only worker never takes a job that asked for CUDA; a `device: auto` job
reaches it once no GPU worker took it within auto_gpu_wait_s; a `--gpu` worker
refuses to start where CUDA is not usable, and says why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.app.conftest import WORKER_TOKEN, job_spec, submit, upload

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One backend is enough: this is about queues and workers, not SQL.
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'torchyard.db'}"


def wait_for(condition, timeout: float = 120, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {condition}")
        time.sleep(every)


def worker_cli(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def training_children(worker: subprocess.Popen) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    return [p for p in pids if b"multiprocessing.spawn" in Path(f"/proc/{p}/cmdline").read_bytes()]


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_a_cpu_worker_runs_auto_jobs_after_the_wait_and_never_takes_cuda_jobs(
    make_server, tmp_path
):
    srv = make_server(reconcile=True, auto_gpu_wait_s=0.5, reconcile_interval_s=0.2)
    with srv.new_user() as user:
        dataset = upload(user)
        cuda_job = submit(user, job_spec(dataset["id"], training__device="cuda"))
        auto_job = submit(
            user, job_spec(dataset["id"], training__device="auto", training__epochs=100_000)
        )
        env = {
            "TORCHYARD_HOME": str(srv.settings.home),
            "TORCHYARD_BROKER_URL": "filesystem://",
            "TORCHYARD_API_URL": srv.url,
            "TORCHYARD_WORKER_TOKEN": WORKER_TOKEN,
            "TORCHYARD_WORK_DIR": str(tmp_path / "work"),
        }
        worker = worker_cli("--name", "cpu-only", env=env, log=tmp_path / "worker.log")
        try:
            wait_for(lambda: user.get(f"/jobs/{auto_job['id']}").json()["status"] == "running")
            assert user.get(f"/jobs/{auto_job['id']}").json()["queue"] == "cpu"
            # The training child inherits the cuBLAS workspace setting from the worker.
            [child] = wait_for(lambda: training_children(worker))
            assert environ_of(child).get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"

            user.post(f"/jobs/{auto_job['id']}/cancel")
            wait_for(lambda: user.get(f"/jobs/{auto_job['id']}").json()["status"] == "cancelled")
            # A CPU job after it: once it ran, the idle worker has polled its queues again.
            cpu_job = submit(user, job_spec(dataset["id"], training__device="cpu"))
            wait_for(lambda: user.get(f"/jobs/{cpu_job['id']}").json()["status"] == "succeeded")

            cuda_now = user.get(f"/jobs/{cuda_job['id']}").json()
            assert cuda_now["status"] == "queued" and cuda_now["attempt"] == 1
            assert [m["queue"] for m in srv.sent_for(cuda_job["id"])] == ["gpu"]
        finally:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        log = (tmp_path / "worker.log").read_text()
        assert "cpu" in log and ".> gpu" not in log and ".> auto" not in log


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine can run a GPU worker")
@pytest.mark.parametrize("gpus", ["0", "0,1"])
def test_a_gpu_worker_refuses_to_start_without_usable_cuda_and_says_why(tmp_path, gpus):
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker", "--gpu", gpus],
        env={**os.environ, "PYTHONPATH": str(ROOT), "TORCHYARD_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    reason = " ".join(done.stderr.split())
    assert f"--gpu {gpus}: CUDA is not usable:" in reason
    if torch.version.cuda is None:
        assert f"this torch ({torch.__version__}) is a CPU-only build" in reason
    else:
        assert "driver" in reason or "no CUDA device" in reason


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--queues", "cpu,gpu"], "--queues gpu needs --gpu with at least 1 GPU(s)"),
        (["--gpu", "0", "--queues", "gpu2"], "--queues gpu2 needs --gpu with at least 2 GPU(s)"),
        (["--gpu", "0,0"], "--gpu '0,0': a GPU is named twice"),
    ],
)
def test_a_worker_refuses_queues_its_gpus_cannot_serve_before_it_starts(tmp_path, args, why):
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), "TORCHYARD_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert why in " ".join(done.stderr.split())
