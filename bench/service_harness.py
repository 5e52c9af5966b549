"""The service as the service benchmarks run it: a fresh database, API processes on a
loopback port, and the HTTP calls of a user and a worker. Not a benchmark itself.

API processes are started the way a deployment runs uvicorn with several workers:
one listening socket, shared by N processes. The socket is made with
proto=IPPROTO_TCP, so asyncio sets TCP_NODELAY on the connections it accepts
(without it, a response written in two pieces waits ~40 ms on Nagle and
delayed ACKs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
API = "/api/v1"


# ------------------------------------------------------------------ databases


@contextlib.contextmanager
def database(kind: str, folder: Path) -> Iterator[str]:
    """A fresh, empty database of `kind` ("postgres" or "sqlite"), dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'torchyard.db'}"
        return
    import psycopg

    name = f"torchyard_bench_{secrets.token_hex(4)}"
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="test") as conn:
        conn.autocommit = True
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="test") as conn:
            conn.autocommit = True
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate(database_url: str) -> None:
    """Create the tables before the API processes start, so they do not race to."""
    from app.migrate import upgrade

    upgrade(database_url)


def psycopg_dsn(database_url: str) -> str:
    """The libpq form of a `postgresql+psycopg://` URL (for raw-driver baselines)."""
    return database_url.replace("postgresql+psycopg://", "postgresql://")


# ---------------------------------------------------------------- API processes


def python_path() -> str:
    """PYTHONPATH for child processes: the repository first, then whatever was set."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


class Settings:
    """What the API processes are started with (passed as TORCHYARD_* variables)."""

    def __init__(self, home: Path, database_url: str, broker_url: str):
        self.home = home
        self.database_url = database_url
        self.broker_url = broker_url
        self.token = "bench-admin-" + secrets.token_hex(16)
        self.worker_token = "bench-worker-" + secrets.token_hex(16)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TORCHYARD_HOME": str(self.home),
            "TORCHYARD_DATABASE_URL": self.database_url,
            "TORCHYARD_BROKER_URL": self.broker_url,
            "TORCHYARD_TOKEN": self.token,
            "TORCHYARD_WORKER_TOKEN": self.worker_token,
            "TORCHYARD_DB_WAIT_S": "0",
            "PYTHONPATH": python_path(),
        }


class Served:
    """`processes` uvicorn processes serving `app` on one loopback socket.

    app: "torchyard" (app.main.create_app, settings from the environment) or
    "floor" (a bare FastAPI route returning the JSON document in `floor_body`; with
    `floor_metrics_body`, a second one answering GET /api/v1/jobs/{id}/metrics).
    """

    def __init__(
        self,
        app: str,
        *,
        processes: int = 1,
        env: dict[str, str] | None = None,
        floor_body: Path | None = None,
        timeout_s: float = 60,
        floor_metrics_body: Path | None = None,
    ):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(2048)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        fd = self.sock.fileno()
        argv = [sys.executable, __file__, "serve", "--fd", str(fd), "--app", app]
        if floor_body is not None:
            argv += ["--floor-body", str(floor_body)]
        if floor_metrics_body is not None:
            argv += ["--floor-metrics-body", str(floor_metrics_body)]
        self.procs = [
            subprocess.Popen(
                argv,
                pass_fds=[fd],
                env=env or {**os.environ, "PYTHONPATH": python_path()},
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(processes)
        ]
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            line = _readline_before(proc, deadline)
            if line.strip() != "ready":
                self.stop()
                raise RuntimeError(f"an API process of {app!r} did not start (exit {proc.poll()})")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.sock.close()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Worker:
    """A real training worker (`torchyard worker`, Celery, solo pool) for `settings`,
    reporting to the API at `api_url`. Its log is `home/worker-NAME.log`."""

    def __init__(
        self,
        settings: Settings,
        api_url: str,
        name: str = "w0",
        *,
        queues: str = "cpu,gpu",
        extra_env: dict[str, str] | None = None,
        timeout_s: float = 120,
    ):
        self.name = name
        self.log = settings.home / f"worker-{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **settings.env(),
            "TORCHYARD_API_URL": api_url,
            "TORCHYARD_WORK_DIR": str(settings.home / f"work-{name}"),
            "TORCHYARD_WORKER_NAME": name,
            **(extra_env or {}),
        }
        argv = [sys.executable, "-m", "app.cli", "worker", "--queues", queues, "--name", name]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while " ready." not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker {name} did not start:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to its process group (the worker and its training child), then kill."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _readline_before(proc: subprocess.Popen[str], deadline: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    return result[0] if result else ""


def _serve(
    fd: int, app_name: str, floor_body: str | None, floor_metrics_body: str | None = None
) -> None:
    """The body of one API process (run as `service_harness.py serve`)."""
    import uvicorn

    if app_name == "torchyard":
        from app.main import create_app

        asgi: Any = create_app()
    else:
        metrics = json.loads(Path(floor_metrics_body).read_text()) if floor_metrics_body else None
        asgi = floor_app(json.loads(Path(floor_body or "").read_text()), metrics)
    config = uvicorn.Config(asgi, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)

    def announce() -> None:
        while not server.started:
            time.sleep(0.01)
        print("ready", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run(sockets=[socket.socket(fileno=fd)])


def floor_app(document: dict[str, Any], metrics: dict[str, Any] | None = None) -> Any:
    """The framework floor: FastAPI answering GET /api/v1/jobs/{id} with a constant document
    (and GET /api/v1/jobs/{id}/metrics with another, when `metrics` is given)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get(API + "/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        return document

    if metrics is not None:

        @app.get(API + "/jobs/{job_id}/metrics")
        async def get_metrics(job_id: str) -> dict[str, Any]:
            return metrics

    return app


# ------------------------------------------------------------------ HTTP calls


class Malformed(Exception):
    """An answer that is not the HTTP/1.1 (or SSE) the client asked for."""


class Connection:
    """One keep-alive HTTP/1.1 connection: GET, answers with a Content-Length or chunked."""

    def __init__(self, port: int, token: str):
        self.port, self.token = port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def request(self, path: str, headers: str) -> bytes:
        return (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: Bearer {self.token}\r\n{headers}\r\n"
        ).encode()

    async def send(self, request: bytes) -> tuple[int, dict[bytes, bytes]]:
        """Send a request; the status code and headers of its answer (the body is next)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = lines[0][9:12]
        if not lines[0].startswith(b"HTTP/1.1 ") or not status.isdigit():
            raise Malformed(f"status line {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise Malformed(f"header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        return int(status), headers

    async def body_pieces(self, headers: dict[bytes, bytes]) -> AsyncIterator[bytes]:
        """The answer's body as it arrives (one piece a chunk); then the connection is ready
        for the next request, or closed if the server said so."""
        reader = self.reader
        assert reader is not None
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                try:
                    size = int(line.split(b";")[0], 16)
                except ValueError:
                    raise Malformed(f"chunk size {line[:40]!r}") from None
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, blank line
                        pass
                    break
                piece = await reader.readexactly(size + 2)
                if piece[-2:] != b"\r\n":
                    raise Malformed("a chunk not followed by CRLF")
                yield piece[:-2]
        elif b"content-length" in headers:
            try:
                length = int(headers[b"content-length"])
            except ValueError:
                raise Malformed(f"content-length {headers[b'content-length'][:40]!r}") from None
            yield await reader.readexactly(length)
        else:
            raise Malformed("neither Content-Length nor chunked on a keep-alive answer")
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()

    async def body(self, headers: dict[bytes, bytes]) -> bytes:
        return b"".join([piece async for piece in self.body_pieces(headers)])

    async def get(self, path: str) -> tuple[int, bytes]:
        status, headers = await self.send(self.request(path, "Accept: application/json\r\n"))
        return status, await self.body(headers)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def client(base_url: str, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base_url + API, headers=headers, timeout=60, verify=False)


def npz_bytes(rows: int = 64, features: int = 4, classes: int = 3) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        x=rng.normal(size=(rows, features)).astype("float32"),
        y=rng.integers(0, classes, size=rows).astype("int64"),
    )
    return buffer.getvalue()


def job_spec(
    dataset_id: str,
    epochs: int = 3,
    *,
    batch_size: int = 16,
    log_every_n_steps: int | None = None,
) -> dict[str, Any]:
    """A small job of the kind a user submits: an MLP on an uploaded NPZ, trained on CPU.
    `log_every_n_steps` None leaves the service's default."""
    spec: dict[str, Any] = {
        "name": "bench-mlp",
        "data": {"train": dataset_id, "inputs": "x", "targets": "y", "batch_size": batch_size},
        "model": {
            "layers": [
                {"type": "linear", "out_features": 64},
                {"type": "relu"},
                {"type": "linear", "out_features": 3},
            ]
        },
        "training": {
            "epochs": epochs,
            "loss": "cross_entropy",
            "metrics": ["accuracy"],
            "device": "cpu",
        },
    }
    if log_every_n_steps is not None:
        spec["training"]["log_every_n_steps"] = log_every_n_steps
    return spec


def expect(response: httpx.Response, status: int) -> Any:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text[:300]}"
        )
    return response.json() if response.content else None


def upload_dataset(user: httpx.Client, data: bytes | None = None) -> str:
    """Upload `data` (an NPZ; npz_bytes() when None) as a dataset; its id."""
    response = user.post("/datasets", files={"file": ("train.npz", data or npz_bytes())})
    return expect(response, 201)["id"]


def submit(user: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    return expect(user.post("/jobs", json=spec), 201)


def claim(worker: httpx.Client, job_id: str, name: str = "bench:1") -> dict[str, Any]:
    return expect(worker.post(f"/worker/jobs/{job_id}/claim", json={"worker": name}), 200)


# ------------------------------------------------------------------ reporting


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}" if value else "0"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="torchyard-bench-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one API process of a benchmark (internal)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--fd", type=int, required=True)
    serve.add_argument("--app", choices=["torchyard", "floor"], required=True)
    serve.add_argument("--floor-body")
    serve.add_argument("--floor-metrics-body")
    args = parser.parse_args(argv)
    _serve(args.fd, args.app, args.floor_body, args.floor_metrics_body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
