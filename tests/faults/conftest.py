"""Process harness of the fault tests: the API, workers, Redis and Postgres as real
processes, each in its own process group so a test can `kill -9` a worker together
with its training child, or take the API or a data store down and bring it back.

Redis is always a private `redis-server` on a free port; the database is a fresh
database on the machine's Postgres, or a private Postgres cluster where a test
restarts it. The shared services are never restarted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.test_service_e2e import free_port, require, short_digits_spec, wait_for
from torchyard import Client

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
TIMING_METRICS = {"epoch_time_s", "samples_per_s"}

# Short enough that a lost worker is noticed in seconds, long enough that a
# worker on two busy cores still heartbeats in time.
FAST_RECOVERY = {
    "TORCHYARD_LEASE_S": "3",
    "TORCHYARD_REQUEUE_AFTER_S": "1",
    "TORCHYARD_RECONCILE_INTERVAL_S": "0.5",
}


def unavailable(reason: str) -> None:
    """Skip where a prerequisite is missing, but fail in CI, which must run everything."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a process we started and everything it started (its process group)."""
    if proc.poll() is None or sig == signal.SIGKILL:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = log.open("a")
    return subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


# ------------------------------------------------------------------ Redis


class PrivateRedis:
    """A redis-server of our own, without persistence: a restart loses every message."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        self.proc = start(argv, dict(os.environ), self.folder / "redis.log")
        wait_for(lambda: self.ping(), timeout=20, every=0.05)

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        kill_group(self.proc)
        self.proc.wait()

    def queue_lengths(self) -> dict[str, int]:
        import redis

        client = redis.Redis(port=self.port)
        return {name: int(client.llen(name)) for name in ("cpu", "gpu")}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    folder = tmp_path / "redis"
    folder.mkdir()
    server = PrivateRedis(folder)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            kill_group(server.proc)


# --------------------------------------------------------------- Postgres


class PrivatePostgres:
    """A throwaway cluster (initdb refuses root: it runs as the postgres user)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="torchyard-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        shutil.chown(self.folder, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def init(self) -> None:
        self._as_postgres(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.folder / "log"), "-w", "start",
        )  # fmt: skip

    def crash(self) -> None:
        """Stop as a crash would: no checkpoint, every connection cut (recovery at start)."""
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.crash()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if os.geteuid() != 0 or not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        unavailable(f"a private Postgres needs root, runuser and {PG_BIN}")
    cluster = PrivatePostgres()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """A new database on the machine's Postgres, dropped afterwards."""
    require("Postgres", "127.0.0.1", 5432)
    import psycopg

    name = f"torchyard_faults_{secrets.token_hex(4)}"
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(
            host="127.0.0.1", user="postgres", dbname="test", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ------------------------------------------------------------------ stack


@dataclass
class Stack:
    """The API (one uvicorn process) and named workers, started and killed on demand."""

    folder: Path
    database_url: str
    broker_url: str
    settings: dict[str, str]
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    worker_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    api: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        env.update(
            TORCHYARD_HOME=str(self.folder / "home"),
            TORCHYARD_DATABASE_URL=self.database_url,
            TORCHYARD_BROKER_URL=self.broker_url,
            TORCHYARD_API_URL=self.url,
            TORCHYARD_WORKER_TOKEN=self.worker_token,
            TORCHYARD_DB_WAIT_S="30",
        )
        env.update(self.settings)
        return env

    # -- the API

    def start_api(self, *, wait: bool = True) -> None:
        env = {
            **self.env(),
            "TORCHYARD_TOKEN": self.token,
            "TORCHYARD_ARTIFACT_DIR": str(self.artifacts),
        }
        argv = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.api = start(argv, env, self.folder / "api.log")
        if wait:
            self.wait_ready()

    def kill_api(self) -> None:
        assert self.api is not None
        kill_group(self.api)
        self.api.wait()

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            if self.api is not None and self.api.poll() is not None:
                raise RuntimeError(f"the API exited with {self.api.returncode}:\n{self.tail()}")
            try:
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=timeout, every=0.2)

    @property
    def artifacts(self) -> Path:
        return self.folder / "artifacts"

    # -- workers

    def start_worker(self, name: str, **settings: str) -> None:
        env = {
            **self.env(),
            "TORCHYARD_WORK_DIR": str(self.folder / f"work-{name}"),
            "TORCHYARD_WORKER_NAME": name,
            **settings,
        }
        argv = [sys.executable, "-m", "app.cli", "worker", "--queues", "cpu,auto", "--name", name]
        self.workers[name] = start(argv, env, self.folder / f"worker-{name}.log")

    def wait_workers_listening(self, timeout: float = 120) -> None:
        """Celery prints 'ready.' once it consumes: a job sent before then waits anyway."""

        def listening() -> bool:
            for name, proc in self.workers.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {name} exited:\n{self.tail()}")
            return all(" ready." in self.log(f"worker-{name}") for name in self.workers)

        wait_for(listening, timeout=timeout, every=0.3)

    def kill_worker(self, name: str) -> None:
        """kill -9 of the worker and its training child (its whole process group)."""
        proc = self.workers[name]
        kill_group(proc)
        proc.wait()

    def signal_worker(self, name: str, sig: int) -> None:
        kill_group(self.workers[name], sig)

    def training_children(self, name: str) -> list[int]:
        """PIDs of the worker's spawned training processes."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.workers[name].pid)], capture_output=True, text=True
        ).stdout.split()
        return [int(pid) for pid in out if _is_training_child(int(pid))]

    # -- looking in

    def client(self) -> Client:
        return Client(self.url, self.token)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(
            f"{self.url}/api/v1{path}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
            **kwargs,
        )

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        url = self.database_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url, autocommit=True) as conn:
            return list(conn.execute(query, params).fetchall())

    def attempts(self, job_id: str) -> list[tuple[int, str, str | None]]:
        """(n, worker, outcome) of each attempt of a job, in order."""
        rows = self.sql(
            "SELECT n, worker, outcome FROM attempts WHERE job_id = %s ORDER BY n", job_id
        )
        return [(int(n), str(worker), outcome) for n, worker, outcome in rows]

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.folder.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in self.workers.values():
            kill_group(proc)  # a warm shutdown would wait for the running job
        if self.api is not None and self.api.poll() is None:
            kill_group(self.api, signal.SIGTERM)
            try:
                self.api.wait(timeout=15)
            except subprocess.TimeoutExpired:
                kill_group(self.api)
        for proc in [*self.workers.values(), self.api]:
            if proc is not None:
                proc.wait()


def _is_training_child(pid: int) -> bool:
    try:
        return b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Build a Stack on a database and broker URL; every one built is stopped at the end."""
    stacks: list[Stack] = []

    def make(database_url: str, broker_url: str, **settings: str) -> Stack:
        folder = tmp_path / f"stack{len(stacks)}"
        folder.mkdir()
        stack = Stack(folder, database_url, broker_url, settings)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


# ---------------------------------------------------------------- jobs


def spec_for(train_id: str, val_id: str, *, epochs: int, **training: Any) -> dict[str, Any]:
    """The end-to-end tests' small digits CNN, with a fixed seed (bit-exact on CPU)."""
    spec = short_digits_spec(train_id, val_id, epochs=epochs)
    spec["training"].update(device="cpu", **training)
    return spec


def wait_status(
    client: Client,
    job_id: str,
    statuses: set[str],
    timeout: float = 180,
    stack: Stack | None = None,
) -> dict:
    """The job once its status is one of `statuses`. On a timeout, which must come before
    pytest-timeout's 300 s to be seen, says where the job stood and, given its `stack`,
    the tail of every process's log."""
    try:
        return wait_for(
            lambda: (job := client.job(job_id).info)["status"] in statuses and job,
            timeout=timeout,
            every=0.3,
        )
    except AssertionError:
        job = client.job(job_id).info
        where = f"job {job_id} still {job['status']} after {timeout:.0f} s: {job}"
        raise AssertionError(where + ("\n" + stack.tail() if stack else "")) from None


def checkpoints_of(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    response = stack.get(f"/jobs/{job_id}/checkpoints")
    return response.json() if response.status_code == 200 else []


def series_of(client: Client, job_id: str) -> dict[tuple[str, int], float | None]:
    """Every stored point keyed by (name, step), checking no key is stored twice."""
    history = client.job(job_id).metrics()
    points: dict[tuple[str, int], float | None] = {}
    for name, series in history.items():
        steps = [p["step"] for p in series]
        assert len(steps) == len(set(steps)), f"{name} has a step twice: {steps}"
        points.update({(name, p["step"]): p["value"] for p in series})
    return points


def assert_downloads_match_listing(stack: Stack, job_id: str, into: Path) -> dict[str, Path]:
    """Download every listed checkpoint; each file's sha256 is the listed one."""
    files: dict[str, Path] = {}
    for listed in checkpoints_of(stack, job_id):
        response = stack.get(f"/jobs/{job_id}/checkpoints/{listed['id']}")
        assert response.status_code == 200, response.text
        assert hashlib.sha256(response.content).hexdigest() == listed["sha256"], listed
        assert len(response.content) == listed["size"]
        path = into / f"{listed['kind']}-{listed['epoch']}"
        path.write_bytes(response.content)
        files[f"{listed['kind']}-{listed['epoch']}"] = path
    return files


@dataclass
class Reference:
    """An uninterrupted run of the same spec by the same engine, in this process."""

    points: dict[tuple[str, int], float]
    last_model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor]


def reference_run(spec: dict[str, Any], examples_dir: Path, run_dir: Path) -> Reference:
    import json

    from safetensors.torch import load_file

    from worker.engine.spec import parse_spec
    from worker.engine.train import run_job

    files = {
        spec["data"]["train"]: examples_dir / "data" / "digits_train.npz",
        spec["data"]["validation"]: examples_dir / "data" / "digits_val.npz",
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1)
    try:
        result = run_job(parse_spec(spec), run_dir, resolve=files.__getitem__)
    finally:
        torch.set_num_threads(threads)
    assert result.status == "succeeded", result.error
    points = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        point = json.loads(line)
        if point["name"] not in TIMING_METRICS:
            points[(point["name"], point["step"])] = point["value"]
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    return Reference(points, state["model"], load_file(str(run_dir / "best.safetensors")))


def without_timing(points: dict[tuple[str, int], float | None]) -> dict[tuple[str, int], Any]:
    return {key: value for key, value in points.items() if key[0] not in TIMING_METRICS}


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), f"{name} differs from the uninterrupted run"
