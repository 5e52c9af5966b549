"""`torchyard serve` as a person starts it: what the terminal shows, what the log file keeps."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
CELERY_BANNER = ("[tasks]", "torchyard.run_job", "SecurityWarning", "Connected to filesystem")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    home: Path
    url: str

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"serve: no {what} (exit {self.proc.poll()}):\n{self.stdout()}{self.stderr()}"
                )
            time.sleep(0.2)

    def interrupt(self) -> int:
        """Ctrl+C as a terminal sends it: SIGINT to serve and its workers (one group)."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout=60)


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(*args: str, port: int | None = None) -> Serve:
        port = port or free_port()
        home = tmp_path / "home"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHYARD_HOME": str(home)}
        for key in ("TORCHYARD_TOKEN", "TORCHYARD_DATABASE_URL", "TORCHYARD_BROKER_URL"):
            env.pop(key, None)
        out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--port", str(port), *args],
                env=env,
                cwd=tmp_path,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # its own process group, as a shell gives a command
            )
        serve = Serve(proc, out, err, home, f"http://127.0.0.1:{port}")
        started.append(serve)
        return serve

    yield start
    for serve in started:
        if serve.proc.poll() is None:
            os.killpg(serve.proc.pid, signal.SIGKILL)
            serve.proc.wait()


def worker_pids(serve: Serve) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(serve.proc.pid)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_serve_shows_url_token_and_worker_ready_and_logs_the_rest_to_a_file(start_serve):
    serve = start_serve()
    serve.wait_for(lambda: "worker ready" in serve.stdout(), "'worker ready'")
    assert httpx.get(serve.url + "/readyz", timeout=10).status_code == 200

    # a worker killed under serve (the OOM killer, say) is news on the terminal
    (pid,) = worker_pids(serve)
    os.kill(pid, signal.SIGKILL)
    serve.wait_for(lambda: "exited" in serve.stderr(), "report of the killed worker")
    assert serve.interrupt() == 0

    log = serve.home / "logs" / "serve.log"
    stdout, stderr = serve.stdout(), serve.stderr()
    assert stdout.splitlines() == [
        f"torchyard API at {serve.url}  (docs: {serve.url}/docs)",
        f"state in {serve.home}",
        "your token (shown once):",
        stdout.splitlines()[3],
        f"logs in {log} (serve --verbose shows them here)",
        "worker ready",
    ]
    assert stdout.splitlines()[3].startswith("  export TORCHYARD_TOKEN=ty_")
    assert stderr.strip() == f"error: worker embedded0 exited with code -9; its log: {log}"
    details = log.read_text()
    for line in CELERY_BANNER:
        assert line in details
    assert "embedded0@" in details and "ready." in details
    assert "Uvicorn running on" in details
    assert '"GET /readyz HTTP/1.1" 200' in details


def test_a_second_start_keeps_the_first_runs_log_beside_the_new_one(start_serve):
    first = start_serve()
    first.wait_for(lambda: "worker ready" in first.stdout(), "'worker ready'")
    assert first.interrupt() == 0
    second = start_serve()
    second.wait_for(lambda: "worker ready" in second.stdout(), "'worker ready'")
    assert second.interrupt() == 0
    assert "token: the one shown at first start" in second.stdout()
    logs = second.home / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["serve.log", "serve.log.1"]
    assert (logs / "serve.log.1").read_text().count("Uvicorn running on") == 1
    assert (logs / "serve.log").read_text().count("Uvicorn running on") == 1
    assert second.stderr() == ""


def test_serve_verbose_shows_everything_in_the_terminal(start_serve):
    serve = start_serve("--verbose")
    serve.wait_for(lambda: "worker ready" in serve.stdout(), "'worker ready'")
    assert httpx.get(serve.url + "/readyz", timeout=10).status_code == 200
    assert serve.interrupt() == 0
    terminal = serve.stdout() + serve.stderr()
    for line in CELERY_BANNER:
        assert line in terminal
    assert "Uvicorn running on" in terminal and '"GET /readyz HTTP/1.1" 200' in terminal
    assert "logs in" not in terminal
    assert not (serve.home / "logs").exists()


def test_a_port_in_use_stops_serve_with_the_reason_on_the_terminal(start_serve):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        serve = start_serve(port=taken.getsockname()[1])
        assert serve.proc.wait(timeout=120) == 3
    assert "address already in use" in serve.stderr()
    assert "Traceback" not in serve.stderr()


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux CPU affinity and two CPUs to split",
)
def test_worker_cpus_split_the_machine_between_training_and_the_api(start_serve, examples_dir):
    from tests.test_service_e2e import short_digits_spec, upload_digits
    from torchyard import Client
    from worker.cpus import format_cpu_list

    cpus = os.sched_getaffinity(0)
    training = max(cpus)
    serve = start_serve("--worker-cpus", str(training))
    serve.wait_for(lambda: "worker ready" in serve.stdout(), "'worker ready'")
    rest = format_cpu_list(cpus - {training})
    assert f"workers on CPUs {training}, the API on {rest}" in serve.stdout()
    assert os.sched_getaffinity(serve.proc.pid) == cpus - {training}
    (worker,) = worker_pids(serve)
    assert os.sched_getaffinity(worker) == {training}

    token = serve.stdout().split("TORCHYARD_TOKEN=")[1].split()[0]
    client = Client(serve.url, token)
    job = client.submit(short_digits_spec(*upload_digits(client, examples_dir), epochs=1))
    assert job.wait(timeout=180).info["status"] == "succeeded"
    # the training child, a process of its own, says where it ran
    assert any(f"threads on CPUs {training})" in line for line in job.logs()), job.logs()[:5]
    assert serve.interrupt() == 0


def test_worker_cpus_the_machine_lacks_stop_serve_with_the_reason(start_serve):
    missing = (os.cpu_count() or 1) + 1
    serve = start_serve("--worker-cpus", str(missing))
    assert serve.proc.wait(timeout=60) == 2
    assert f"--worker-cpus {missing}: CPU {missing} is not one this worker may run on" in (
        serve.stderr()
    )
    assert "Traceback" not in serve.stderr()
