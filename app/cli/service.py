"""The service's processes: `serve` (API and workers in one command) and `worker`.

The one module of `app/` that imports the worker process (`worker.celery_app`): it
starts it (tests/test_import_contracts.py).
"""

from __future__ import annotations

import contextlib
import os
from typing import Annotated, Any

import typer

from app.cli.terminal import console, err, fail

STARTUP_FAILURE = 3  # uvicorn.run's exit code when the server could not start


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Training worker processes to start.")] = 1,
    gpus_per_worker: Annotated[
        int,
        typer.Option(
            min=1,
            help="GPUs each worker holds (worker i: GPUs i*K to i*K+K-1), for jobs of "
            "resources.gpus up to K; workers past the last whole set train on the CPU.",
        ),
    ] = 1,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Show the API's and the workers' logs here instead of in $TORCHYARD_HOME/logs/serve.log.",
        ),
    ] = False,
    worker_cpus: Annotated[
        str | None,
        typer.Option(
            envvar="TORCHYARD_WORKER_CPUS",
            help="Run the workers on these CPUs (1-7, as taskset -c) and the API on the "
            "others, so neither slows the other.",
        ),
    ] = None,
) -> None:
    """Start the API and training workers with embedded defaults (SQLite, no broker server)."""
    import logging
    import threading

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from app.bootstrap import bootstrap
    from app.cli import serve_logs
    from app.cli.embedded_workers import EmbeddedWorkers
    from app.config import Settings, with_worker_token
    from app.main import create_app
    from worker.cpus import check_cpus, format_cpu_list, keep_off
    from worker.gpus import serve_gpus

    try:
        training_cpus = check_cpus(worker_cpus) if worker_cpus else set()
    except ValueError as exc:
        raise fail(str(exc).replace("--cpus", "--worker-cpus", 1), code=2) from None
    gpus = serve_gpus(workers, gpus_per_worker)  # worker i: GPUs i*K..; the rest the CPU
    # No GPU worker: `auto` jobs go to the CPU workers at once.
    no_wait: dict[str, Any] = {} if any(gpus) else {"auto_gpu_wait_s": 0}
    env_url = os.environ.get("TORCHYARD_API_URL")
    settings = Settings(api_url=env_url or f"http://{host}:{port}", **no_wait)
    settings = with_worker_token(settings)
    token = bootstrap(settings)
    log_path = None if verbose else serve_logs.fresh_log(settings.home)
    child_env = {
        **os.environ,
        "TORCHYARD_HOME": str(settings.home),
        "TORCHYARD_API_URL": settings.api_url,
        "TORCHYARD_BROKER_URL": settings.broker_url,
        "TORCHYARD_WORKER_TOKEN": settings.worker_token or "",
        "PYTHONUNBUFFERED": "1",  # the log shows a worker's lines as they happen
    }
    if worker_cpus:
        child_env["TORCHYARD_WORKER_CPUS"] = worker_cpus
    with contextlib.ExitStack() as stack:
        output = stack.enter_context(log_path.open("a")) if log_path else None
        embedded = EmbeddedWorkers(
            gpus,
            child_env,
            output=output,
            log_path=log_path,
            say=lambda line: console.print(line, highlight=False),
            warn=lambda line: err.print(
                f"[red]error:[/red] {line}", highlight=False, soft_wrap=True
            ),
        )
        # The workers have started, on every CPU: each pins itself to the set.
        api_cpus = keep_off(training_cpus) if training_cpus else set()
        console.print(
            f"torchyard API at {settings.api_url}  (docs: {settings.api_url}/docs)",
            highlight=False,
        )
        if training_cpus:
            where = f", the API on {format_cpu_list(api_cpus)}" if api_cpus else ""
            console.print(
                f"workers on CPUs {format_cpu_list(training_cpus)}{where}", highlight=False
            )
        console.print(f"state in {settings.home}", highlight=False, soft_wrap=True)
        if token:
            # Plain print: a wrapped token would not survive copy and paste.
            print(f"your token (shown once):\n  export TORCHYARD_TOKEN={token}", flush=True)
        else:
            console.print(
                "token: the one shown at first start, or $TORCHYARD_TOKEN", highlight=False
            )
        if log_path:
            console.print(
                f"logs in {log_path} (serve --verbose shows them here)",
                highlight=False,
                soft_wrap=True,
            )
            logging.captureWarnings(True)
        else:
            serve_logs.verbose_logging()

        class Server(uvicorn.Server):
            """On SIGINT/SIGTERM, stops the workers before the API: their last reports
            and the release of their jobs need the API. A second Ctrl-C stops at once."""

            stopping: threading.Thread | None = None

            def handle_exit(self, sig: int, frame: Any) -> None:
                # Ctrl+C reaches the workers too: their exit from here on is no surprise.
                embedded.stopping.set()
                if self.stopping is not None:
                    super().handle_exit(sig, frame)
                    return

                def workers_then_api() -> None:
                    embedded.stop()
                    super(Server, self).handle_exit(sig, None)

                self.stopping = threading.Thread(target=workers_then_api, daemon=True)
                self.stopping.start()

        config = uvicorn.Config(
            create_app(settings),
            host=host,
            port=port,
            log_level="info" if verbose else None,
            log_config=serve_logs.uvicorn_log_config(log_path) if log_path else LOGGING_CONFIG,
            # Open SSE streams would otherwise hold a shutdown until they end.
            timeout_graceful_shutdown=1,
        )
        server = Server(config)
        try:
            # As uvicorn.run runs it: a signal ends run(), SIGINT as a KeyboardInterrupt.
            with contextlib.suppress(KeyboardInterrupt):
                server.run()
        finally:
            embedded.stop()
        if not server.started:
            raise typer.Exit(STARTUP_FAILURE)


def worker_command(
    gpu: Annotated[
        str | None,
        typer.Option(
            help="Train on this GPU only, or on this set of GPUs (0,1: jobs of up to 2 "
            "GPUs); sets CUDA_VISIBLE_DEVICES.",
        ),
    ] = None,
    queues: Annotated[
        str | None,
        typer.Option(
            help="Queues to take jobs from (default with --gpu: gpu, gpu2..gpuK for a set "
            "of K, and auto; without: cpu)."
        ),
    ] = None,
    cpus: Annotated[
        str | None,
        typer.Option(
            envvar="TORCHYARD_WORKER_CPUS",
            help="Run on these CPUs only (0-3,8, as taskset -c); torch takes one thread "
            "a CPU. Give the API and its database the other CPUs (serve --worker-cpus "
            "does it for its own API).",
        ),
    ] = None,
    name: Annotated[str, typer.Option(help="Worker name (unique per host).")] = "worker",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    ready_fd: Annotated[
        int | None, typer.Option(hidden=True, help="serve's pipe: write NAME when ready.")
    ] = None,
) -> None:
    """Start a training worker: one job at a time, each in its own child process."""
    from worker.cpus import pin_worker
    from worker.gpus import parse_gpu_set, worker_environment, worker_gpu_problem
    from worker.settings import worker_queues

    try:
        gpus = parse_gpu_set(gpu) if gpu is not None else []
        consumed = worker_queues(len(gpus), queues)
        if cpus:
            pin_worker(cpus)  # before any thread starts: each inherits the set
    except ValueError as exc:
        raise fail(str(exc), code=2) from None
    # Before torch starts CUDA anywhere: the worker and its children see its GPUs only.
    os.environ.update(worker_environment(gpus))
    problem = worker_gpu_problem(len(gpus)) if gpus else None
    if problem:
        raise fail(f"--gpu {gpu}: CUDA is not usable: {problem}")
    from worker.celery_app import app as celery

    if ready_fd is not None:
        _tell_when_ready(ready_fd, name)
    celery.worker_main(
        [
            "worker",
            "-Q",
            ",".join(consumed),
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


def _tell_when_ready(fd: int, name: str) -> None:
    """Write `name` to serve's pipe once Celery consumes from the queues, then close it."""
    from celery.signals import worker_ready

    def ready(**_: Any) -> None:
        with contextlib.suppress(OSError):  # serve is gone: nobody to tell
            os.write(fd, f"{name}\n".encode())
            os.close(fd)

    worker_ready.connect(ready, weak=False)
