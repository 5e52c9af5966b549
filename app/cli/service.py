"""The service's processes: `serve` (API and workers in one command) and `worker`.

The one module of `app/` that imports the worker process (`worker.celery_app`): it
starts it (tests/test_import_contracts.py).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from app.cli.terminal import console


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Training worker processes to start.")] = 1,
) -> None:
    """Start the API and training workers with embedded defaults (SQLite, no broker server)."""
    import os
    import subprocess

    import uvicorn

    from app.bootstrap import bootstrap
    from app.config import Settings, with_worker_token
    from app.main import create_app

    env_url = os.environ.get("TORCHYARD_API_URL")
    settings = Settings(api_url=env_url or f"http://{host}:{port}")  # type: ignore[call-arg]
    settings = with_worker_token(settings)
    token = bootstrap(settings)
    child_env = {
        **os.environ,
        "TORCHYARD_HOME": str(settings.home),
        "TORCHYARD_API_URL": settings.api_url,
        "TORCHYARD_BROKER_URL": settings.broker_url,
        "TORCHYARD_WORKER_TOKEN": settings.worker_token or "",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--name", f"embedded{i}"],
            env=child_env,
            preexec_fn=_die_with_parent,
        )
        for i in range(workers)
    ]
    console.print(
        f"torchyard API at {settings.api_url}  (docs: {settings.api_url}/docs)", highlight=False
    )
    console.print(f"state in {settings.home}", highlight=False)
    if token:
        # Plain print: a wrapped token would not survive copy and paste.
        print(f"your token (shown once):\n  export TORCHYARD_TOKEN={token}", flush=True)
    else:
        console.print("token: the one shown at first start, or $TORCHYARD_TOKEN", highlight=False)
    try:
        # Open SSE streams would otherwise hold a shutdown until they end.
        uvicorn.run(
            create_app(settings),
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=3,
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _die_with_parent() -> None:
    """Linux: a worker started by `serve` gets SIGTERM when serve dies, even by SIGKILL."""
    import contextlib
    import ctypes
    import signal

    # Not Linux: no libc.so.6, and serve's own shutdown still stops its workers.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def worker_command(
    gpu: Annotated[
        int | None, typer.Option(help="Train on this GPU only (sets CUDA_VISIBLE_DEVICES).")
    ] = None,
    queues: Annotated[
        str | None,
        typer.Option(help="Queues to take jobs from (default: gpu with --gpu, else cpu,gpu)."),
    ] = None,
    name: Annotated[str, typer.Option(help="Worker name (unique per host).")] = "worker",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Start a training worker: one job at a time, each in its own child process."""
    import os

    if gpu is not None:
        # Before torch is imported anywhere: the worker and its children see one GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        os.environ["TORCHYARD_GPU"] = str(gpu)
    from worker.celery_app import app as celery

    celery.worker_main(
        [
            "worker",
            "-Q",
            queues or ("gpu" if gpu is not None else "cpu,gpu"),
            "--pool",
            "solo",
            "--concurrency",
            "1",
            "--loglevel",
            loglevel,
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )
