"""The whole service end to end, with real processes as users deploy it.

Two deployments:
- `compose`: the commands and environment `docker-compose.yml` gives its `api`
  and `worker` services, launched as local processes against the real local
  Postgres and Redis (hostnames and ports rewritten to loopback);
- `embedded`: `torchyard serve` (SQLite, the filesystem broker, a local folder).

A user uploads data, submits, follows the SSE stream to the end, reads metrics,
downloads the best weights and checks them against the reported best value.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from torchyard import Client

ROOT = Path(__file__).resolve().parent.parent
# a database of its own, flushed before use; one a test process (pytest-xdist's gw0, gw1)
REDIS_DB = 7 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require(service: str, host: str, port: int) -> None:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{service} is required in CI ({host}:{port}): {exc}")
        pytest.skip(f"{service} not reachable on {host}:{port}: {exc}")


@dataclass
class Service:
    url: str
    token: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # what its processes were started with

    def client(self) -> Client:
        return Client(self.url, self.token)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the service did not become ready:\n{self.tail()}")

    def tail(self) -> str:
        if not self.logs:
            return ""
        # the embedded serve keeps its API and worker logs under its home (logs/serve.log)
        files = sorted([*self.logs.glob("*.log"), *self.logs.glob("*/logs/serve.log")])
        return "\n".join(p.read_text()[-3000:] for p in files)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)


def as_local_argv(command: list[str]) -> list[str]:
    """Compose runs `uvicorn ...` / `torchyard ...` from the image's PATH; run the same here."""
    program, *args = command
    modules = {"uvicorn": ["-m", "uvicorn"], "torchyard": ["-m", "app.cli"]}
    return [sys.executable, *modules[program], *args]


def compose_env(environment: dict[str, str], overrides: dict[str, str]) -> dict[str, str]:
    missing = set(overrides) - set(environment)
    assert not missing, f"docker-compose.yml no longer sets {missing}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update({key: str(value) for key, value in environment.items()})
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def compose_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """docker-compose.yml's api and two workers, as local processes on Postgres and Redis."""
    require("Postgres", "127.0.0.1", 5432)
    require("Redis", "127.0.0.1", 6379)
    import psycopg
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    dbname = f"torchyard_e2e_{secrets.token_hex(4)}"
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    tmp = tmp_path_factory.mktemp("compose")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token, worker_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    shared = {
        "TORCHYARD_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}",
        "TORCHYARD_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "TORCHYARD_API_URL": url,
        "TORCHYARD_WORKER_TOKEN": worker_token,
    }
    service = Service(url=url, token=token, logs=tmp)

    api = compose["api"]
    command = [str(part) for part in api["command"]]
    command[command.index("--port") + 1] = str(port)
    command[command.index("--host") + 1] = "127.0.0.1"
    api_env = compose_env(
        api["environment"],
        {**shared, "TORCHYARD_TOKEN": token, "TORCHYARD_ARTIFACT_DIR": str(tmp / "artifacts")},
    )
    api_env["TORCHYARD_LEASE_S"] = "10"
    # No GPU here: `auto` jobs go to the CPU workers at once, as in a deployment without GPUs.
    api_env["TORCHYARD_AUTO_GPU_WAIT_S"] = "0"
    service.procs["api"] = spawn(as_local_argv(command), api_env, tmp / "api.log")

    for i in range(2):  # services worker-gpu0 and worker-gpu1, one GPU each
        worker = compose[f"worker-gpu{i}"]
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["device_ids"] == [str(i)] and devices[0]["capabilities"] == ["gpu"]
        env = compose_env(
            worker["environment"], {**shared, "TORCHYARD_WORK_DIR": str(tmp / f"work{i}")}
        )
        command = [str(part) for part in worker["command"]]
        # No GPU on this machine: the same worker without --gpu (a CPU worker).
        at = command.index("--gpu")
        command[at : at + 2] = []
        argv = [*as_local_argv(command), "--name", f"w{i}"]
        service.procs[f"worker{i}"] = spawn(argv, env, tmp / f"worker{i}.log")
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()
        with psycopg.connect(
            host="127.0.0.1", user="postgres", dbname="test", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@pytest.fixture(scope="module")
def embedded_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`torchyard serve` exactly as the README's quickstart runs it."""
    with serve_embedded(tmp_path_factory.mktemp("embedded")) as service:
        yield service


@contextlib.contextmanager
def serve_embedded(tmp: Path) -> Iterator[Service]:
    """`torchyard serve` with its embedded defaults in a home of its own under `tmp`."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHYARD_HOME": str(tmp / "home")}
    for key in ("TORCHYARD_TOKEN", "TORCHYARD_DATABASE_URL", "TORCHYARD_BROKER_URL"):
        env.pop(key, None)
    proc = spawn(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env, tmp / "serve.log"
    )
    service = Service(
        url=f"http://127.0.0.1:{port}", token="", procs={"serve": proc}, logs=tmp, env=env
    )
    try:
        service.wait_ready()
        match = re.search(r"TORCHYARD_TOKEN=(\S+)", (tmp / "serve.log").read_text())
        assert match, service.tail()
        service.token = match.group(1)
        yield service
    finally:
        service.stop()


def short_digits_spec(train_id: str, val_id: str, epochs: int = 3) -> dict[str, Any]:
    spec = json.loads((ROOT / "examples" / "digits_cnn.json").read_text())
    spec["data"].update(train=train_id, validation=val_id)
    spec["model"]["layers"] = [
        {"type": "conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.2},
        {"type": "linear", "out_features": 10},
    ]
    spec["training"].update(
        epochs=epochs, loss="cross_entropy", scheduler=None, log_every_n_steps=10
    )
    spec["callbacks"] = {"checkpoint": {"monitor": "val_accuracy", "mode": "max"}}
    return spec


def upload_digits(client: Client, examples_dir: Path) -> tuple[str, str]:
    train = client.datasets.upload(examples_dir / "data" / "digits_train.npz")
    val = client.datasets.upload(examples_dir / "data" / "digits_val.npz")
    assert train["fields"]["x"]["shape"] == [1, 8, 8]
    return train["id"], val["id"]


def val_accuracy_of(weights: Path, spec: dict[str, Any], examples_dir: Path) -> float:
    from worker.engine.build import build_model
    from worker.engine.data import describe, resolve_fields
    from worker.engine.spec import parse_spec

    spec = {
        **spec,
        "data": {**spec["data"], "train": "digits_train.npz", "validation": "digits_val.npz"},
    }
    parsed = parse_spec(spec)
    val = examples_dir / "data" / "digits_val.npz"
    inputs, targets = resolve_fields(parsed.data, describe(val).fields)
    model = build_model(parsed, inputs, targets, device="cpu").module
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    arrays = np.load(val)
    with torch.no_grad():
        predicted = model(torch.from_numpy(arrays["x"])).argmax(1).numpy()
    return float((predicted == arrays["y"]).mean())


def wait_for(predicate: Any, timeout: float = 120, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


@pytest.mark.slow
@pytest.mark.parametrize("deployment", ["compose", "embedded"])
def test_upload_submit_follow_download_matches_the_reported_best(
    deployment, request, examples_dir, tmp_path
):
    service: Service = request.getfixturevalue(f"{deployment}_service")
    client = service.client()
    train_id, val_id = upload_digits(client, examples_dir)
    spec = short_digits_spec(train_id, val_id)
    job = client.submit(spec)
    assert job.status == "queued"

    kinds: list[str] = []
    statuses: list[str] = []
    for _, kind, data in job.follow():
        kinds.append(kind)
        if kind == "status":
            statuses.append(data["status"])
    assert kinds[-1] == "end"
    assert {"status", "metrics", "checkpoint", "log"} <= set(kinds)
    assert statuses[:2] == ["queued", "running"] and statuses[-1] == "succeeded"

    final = job.refresh().info
    assert final["status"] == "succeeded", final.get("error")
    assert final["best"]["monitor"] == "val_accuracy"
    assert final["progress"]["epochs"] == 3 and final["progress"]["step"] == 135
    assert {"loss", "val_loss", "val_accuracy", "lr"} <= set(final["metrics"])
    logs = httpx.get(
        f"{service.url}/api/v1/jobs/{job.id}/logs",
        headers={"Authorization": f"Bearer {service.token}"},
    ).json()["lines"]
    assert any(line.startswith("epoch 2 of 3:") for line in logs)
    history = job.metrics(["val_accuracy", "loss"])
    values = [p["value"] for p in history["val_accuracy"]]
    assert len(values) == 3 and len(history["loss"]) == 3
    assert final["best"]["value"] == max(values)

    weights = job.download(tmp_path / "best.safetensors")
    assert val_accuracy_of(weights, spec, examples_dir) == pytest.approx(
        final["best"]["value"], abs=1e-9
    )
    listed = httpx.get(
        f"{service.url}/api/v1/jobs/{job.id}/checkpoints",
        headers={"Authorization": f"Bearer {service.token}"},
    ).json()
    import hashlib

    best = [c for c in listed if c["kind"] == "best" and c["epoch"] == final["best"]["epoch"]]
    assert best and best[0]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


@pytest.mark.slow
def test_cancel_a_running_job_keeps_its_best_checkpoint(compose_service, examples_dir, tmp_path):
    client = compose_service.client()
    train_id, val_id = upload_digits(client, examples_dir)
    job = client.submit(short_digits_spec(train_id, val_id, epochs=500))
    wait_for(lambda: any(c["kind"] == "best" for c in _checkpoints(compose_service, job.id)))
    assert job.cancel().status in ("running", "cancelled")
    assert job.wait(timeout=60).status == "cancelled"
    assert job.download(tmp_path / "w.safetensors").stat().st_size > 0


@pytest.mark.slow
def test_two_jobs_run_at_once_on_two_workers(compose_service, examples_dir):
    client = compose_service.client()
    train_id, val_id = upload_digits(client, examples_dir)
    jobs = [client.submit(short_digits_spec(train_id, val_id, epochs=40)) for _ in range(2)]
    wait_for(lambda: all(j.refresh().status == "running" for j in jobs), timeout=90)
    for job in jobs:
        job.cancel()
    assert {job.wait(timeout=120).status for job in jobs} <= {"cancelled", "succeeded"}


def _checkpoints(service: Service, job_id: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{service.url}/api/v1/jobs/{job_id}/checkpoints",
        headers={"Authorization": f"Bearer {service.token}"},
    )
    return response.json() if response.status_code == 200 else []


def test_serve_leaves_no_worker_behind_when_killed(tmp_path):
    """Even a SIGKILLed `serve` takes its training workers with it."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHYARD_HOME": str(tmp_path / "home")}
    proc = spawn(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env, tmp_path / "serve.log"
    )
    service = Service(
        url=f"http://127.0.0.1:{port}", token="", procs={"serve": proc}, logs=tmp_path
    )
    service.wait_ready()
    children = subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert children, "serve started no worker"
    proc.kill()
    proc.wait()

    def gone() -> bool:
        return all(not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid) for pid in children)

    wait_for(gone, timeout=30)


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


@pytest.mark.slow
def test_cli_upload_submit_follow_download(embedded_service, examples_dir, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TORCHYARD_URL": embedded_service.url,
        "TORCHYARD_TOKEN": embedded_service.token,
        "COLUMNS": "200",
    }

    def torchyard(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "app.cli", *args]
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )

    ids = []
    for name in ("digits_train.npz", "digits_val.npz"):
        run = torchyard("upload", str(examples_dir / "data" / name))
        assert run.returncode == 0, run.stderr
        ids.append(run.stdout.split()[0])
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(short_digits_spec(*ids, epochs=2)))
    run = torchyard("submit", str(spec), "--follow")
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.split()[0]
    assert "succeeded" in run.stdout and "best val_accuracy" in run.stdout
    assert "epoch 1 of 2:" in run.stdout
    listed = torchyard("jobs")
    assert job_id in listed.stdout
    got = torchyard("download", job_id, "--format", "pt2", "-o", "model.pt2")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "model.pt2").stat().st_size > 0
    missing = torchyard("status", "no-such-job")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: no job 'no-such-job'"
