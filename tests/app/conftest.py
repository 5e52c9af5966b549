"""The API served for real: uvicorn on a loopback port, against SQLite and Postgres.

Each backend gets one shared server per test session; tests stay apart by
creating their own users. Tests that need other settings start their own
server with `make_server`. The broker is the embedded `filesystem://` transport,
so dispatch is real and tests can read the messages it wrote.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from app.config import Settings
from app.db import session_scope
from app.main import create_app
from app.store import users

PG_HOST = "127.0.0.1"
PG_PORT = 5432
WORKER_TOKEN = "worker-" + secrets.token_hex(16)
ADMIN_TOKEN = "admin-" + secrets.token_hex(16)


# ------------------------------------------------------------------ postgres


def _pg_connect(dbname: str) -> Any:
    import psycopg

    last: Exception | None = None
    for user in ("postgres", "root"):
        try:
            conn = psycopg.connect(
                host=PG_HOST, port=PG_PORT, user=user, dbname=dbname, connect_timeout=3
            )
            conn.autocommit = True
            return conn, user
        except psycopg.OperationalError as exc:
            last = exc
    raise ConnectionError(str(last))


def _pg_unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Postgres is required in CI: {reason}")
    pytest.skip(f"Postgres not reachable on {PG_HOST}:{PG_PORT}: {reason}")


@dataclass
class Postgres:
    user: str

    def url(self, name: str) -> str:
        return f"postgresql+psycopg://{self.user}@{PG_HOST}:{PG_PORT}/{name}"

    def create(self, name: str) -> str:
        conn, _ = _pg_connect("test")
        with conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop(self, name: str) -> None:
        conn, _ = _pg_connect("test")
        with conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def execute(self, sql: str) -> None:
        conn, _ = _pg_connect("test")
        with conn:
            conn.execute(sql)


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    try:
        conn, user = _pg_connect("test")
    except (ConnectionError, ImportError) as exc:
        _pg_unavailable(str(exc))
    conn.close()
    return Postgres(user)


@pytest.fixture(scope="session")
def postgres_url(postgres: Postgres) -> Iterator[str]:
    """A fresh database for this test session, dropped at the end."""
    name = f"torchyard_test_{secrets.token_hex(4)}"
    url = postgres.create(name)
    yield url
    postgres.drop(name)


# -------------------------------------------------------------------- server


class Server:
    """One app on a loopback port, served by uvicorn in a thread."""

    def __init__(self, settings: Settings, *, reconcile: bool = False):
        self.settings = settings
        self.app = create_app(settings, reconcile=reconcile)
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then,
        # and without it every response waits ~40 ms on Nagle and delayed ACKs.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def sessions(self) -> Any:
        return self.app.state.sessions

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # verify=False: plain HTTP on loopback; it skips loading the CA bundle (~50 ms a client)
        return httpx.Client(
            base_url=self.url + "/api/v1", headers=headers, timeout=30, verify=False, **kwargs
        )

    def new_user(self, name: str | None = None) -> httpx.Client:
        """A client authenticated as a new user of its own."""
        with session_scope(self.sessions) as session:
            _, token = users.create_user_with_token(session, name or f"user-{secrets.token_hex(4)}")
        return self.client(token)

    def worker(self, token: str = WORKER_TOKEN) -> httpx.Client:
        return self.client(token)

    def broker_messages(self) -> list[dict[str, Any]]:
        """Tasks waiting in the filesystem broker: [{"queue", "task", "args"}]."""
        out = []
        folder = self.settings.home / "broker" / "queue"
        for path in sorted(folder.glob("*.msg")):
            message = json.loads(path.read_text())
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            out.append(
                {
                    "queue": path.name.split(".")[-2],
                    "task": message["headers"]["task"],
                    "args": args,
                    "path": path,
                }
            )
        return out

    def sent_for(self, job_id: str) -> list[dict[str, Any]]:
        return [m for m in self.broker_messages() if m["args"] == [job_id]]


def server_settings(home: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": home,
        "database_url": database_url,
        "broker_url": "filesystem://",
        "worker_token": WORKER_TOKEN,
        "token": ADMIN_TOKEN,
        "db_wait_s": 0,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'torchyard.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared server of one backend (reconciler off: tests run it by hand)."""
    srv = Server(server_settings(tmp_path_factory.mktemp("home"), database_url))
    yield srv
    srv.stop()


@pytest.fixture
def make_server(database_url: str, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start a server with other settings on the same database; stopped after the test."""
    started: list[Server] = []

    def make(reconcile: bool = False, **overrides: Any) -> Server:
        home = tmp_path / f"home{len(started)}"
        srv = Server(server_settings(home, database_url, **overrides), reconcile=reconcile)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def user(server: Server) -> Iterator[httpx.Client]:
    with server.new_user() as client:
        yield client


@pytest.fixture
def worker(server: Server) -> Iterator[httpx.Client]:
    with server.worker() as client:
        yield client


# ---------------------------------------------------------------------- data


def npz_bytes(rows: int = 64, features: int = 4, classes: int = 3, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        x=rng.normal(size=(rows, features)).astype("float32"),
        y=rng.integers(0, classes, size=rows).astype("int64"),
    )
    return buffer.getvalue()


def upload(
    client: httpx.Client, data: bytes | None = None, filename: str = "train.npz"
) -> dict[str, Any]:
    response = client.post("/datasets", files={"file": (filename, data or npz_bytes())})
    assert response.status_code == 201, response.text
    return response.json()


def job_spec(train: str, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "tiny-mlp",
        "data": {"train": train, "inputs": "x", "targets": "y", "batch_size": 16},
        "model": {
            "layers": [
                {"type": "linear", "out_features": 8},
                {"type": "relu"},
                {"type": "linear", "out_features": 3},
            ]
        },
        "training": {
            "epochs": 3,
            "loss": "cross_entropy",
            "metrics": ["accuracy"],
            "device": "cpu",
        },
    }
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return spec


def submit(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def dataset(user: httpx.Client) -> dict[str, Any]:
    return upload(user)


@pytest.fixture
def queued_job(user: httpx.Client, dataset: dict[str, Any]) -> dict[str, Any]:
    return submit(user, job_spec(dataset["id"]))


@dataclass
class Attempt:
    """A worker's view of a claimed job: its attempt-token client and the claim answer."""

    job_id: str
    client: httpx.Client
    claim: dict[str, Any]

    def post(self, what: str, body: dict[str, Any]) -> httpx.Response:
        return self.client.post(f"/worker/jobs/{self.job_id}/{what}", json=body)


def claim(server: Server, job_id: str, worker_name: str = "host:1") -> Attempt:
    with server.worker() as client:
        response = client.post(f"/worker/jobs/{job_id}/claim", json={"worker": worker_name})
    assert response.status_code == 200, response.text
    body = response.json()
    return Attempt(job_id, server.client(body["token"]), body)


def points(
    *values: float, name: str = "loss", start: int = 0, epoch: int = 0
) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "step": start + i,
            "epoch": epoch,
            "value": v,
            "time": 1_700_000_000.0 + start + i,
        }
        for i, v in enumerate(values)
    ]
