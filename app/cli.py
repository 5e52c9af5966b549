"""The `torchyard` command: local runs (schema, validate, train, export)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from worker.engine.callbacks import Callback
from worker.engine.errors import DataError, SpecError

app = typer.Typer(
    help="torchyard: train PyTorch models from JSON job specs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="The job spec (JSON).", show_default=False)]
InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Per-sample shape of an input, NAME=D1,D2,... (no batch dim); repeat for several. "
        "Replaces reading the dataset.",
    ),
]


def main() -> None:
    app()


def _fail(lines: list[str] | str, code: int = 1) -> typer.Exit:
    for line in [lines] if isinstance(lines, str) else lines:
        err.print(f"[red]error:[/red] {line}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


def _load_spec(path: Path) -> Any:
    from worker.engine.spec import parse_spec

    try:
        text = path.read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror}") from None
    try:
        return parse_spec(text)
    except SpecError as exc:
        raise _fail([str(issue) for issue in exc.issues]) from None


def _resolver(spec_path: Path) -> Any:
    """Relative dataset paths in a spec are relative to the spec file's folder."""
    base = spec_path.resolve().parent

    def resolve(ref: str) -> Path:
        path = Path(ref).expanduser()
        return path if path.is_absolute() else base / path

    return resolve


def _parse_shapes(values: list[str], spec: Any) -> dict[str, Any]:
    from worker.engine.fields import FieldInfo

    fields = spec.data.input_fields()
    by_field = {f: name for name, f in fields.items() if isinstance(f, str)}
    out: dict[str, FieldInfo] = {}
    for value in values:
        name, sep, dims = value.rpartition("=")
        if not sep and len(fields) == 1:
            name = next(iter(fields))
        name = by_field.get(name, name)
        if len(fields) == 1 and name not in fields:
            name = next(iter(fields))
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            raise _fail(
                f"--input-shape {value!r}: expected NAME=D1,D2,... with integer sizes"
            ) from None
        if name not in fields:
            raise _fail(
                f"--input-shape {value!r}: unknown input {name!r} (inputs: {', '.join(fields)})"
            )
        out[name] = FieldInfo(shape=shape, dtype="float32")
    missing = [name for name in fields if name not in out]
    if missing:
        raise _fail(f"--input-shape missing for input(s): {', '.join(missing)}")
    return out


def _fields(
    spec: Any, spec_path: Path, input_shapes: list[str] | None
) -> tuple[dict[str, Any], Any]:
    from worker.engine.data import describe, resolve_fields

    if input_shapes:
        return _parse_shapes(input_shapes, spec), None
    try:
        info = describe(_resolver(spec_path)(spec.data.train))
        return resolve_fields(spec.data, info.fields)
    except SpecError as exc:
        raise _fail([str(issue) for issue in exc.issues]) from None
    except (DataError, OSError) as exc:
        raise _fail(f"data.train: {exc} (or give --input-shape to validate without data)") from None


@app.command()
def schema() -> None:
    """Print the JSON Schema of a job spec."""
    from worker.engine.spec import job_schema

    sys.stdout.write(json.dumps(job_schema(), indent=2) + "\n")


def _max_params() -> int:
    """TORCHYARD_MAX_PARAMS alone: checking a spec needs none of the service's settings, so a
    shell set up for a deployed service (no secrets at hand) can still validate."""
    from pydantic import ValidationError
    from pydantic_settings import BaseSettings, SettingsConfigDict

    from app.config import Settings

    class Limits(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="TORCHYARD_", extra="ignore")
        max_params: int = Settings.model_fields["max_params"]

    try:
        return Limits().max_params
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise _fail(f"TORCHYARD_MAX_PARAMS: {error['msg']}, found {error.get('input')!r}") from None


@app.command()
def validate(
    spec_path: SpecArg,
    input_shape: InputShapeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Check a spec and print the model summary (built on the meta device: no weights allocated)."""
    from worker.engine.build import build_model

    spec = _load_spec(spec_path)
    inputs, targets = _fields(spec, spec_path, input_shape)
    try:
        built = build_model(spec, inputs, targets, device="meta", max_params=_max_params())
    except SpecError as exc:
        raise _fail([str(issue) for issue in exc.issues]) from None
    if as_json:
        sys.stdout.write(json.dumps(built.summary.as_dict(), indent=2) + "\n")
    else:
        console.print(built.summary.render())


@app.command()
def train(
    spec_path: SpecArg,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder for metrics and checkpoints.")
    ],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a spec on this machine; write metrics.jsonl, best.safetensors, last.pt, result.json."""
    from worker.engine.train import run_job

    spec = _load_spec(spec_path)
    callbacks = [] if quiet else [_ProgressBar(console)]
    result = run_job(
        spec,
        out,
        resolve=_resolver(spec_path),
        callbacks=callbacks,
        resume=resume,
        max_params=_max_params(),
    )
    for cb in callbacks:
        cb.close()
    _print_result(result, out)
    if result.status == "failed":
        raise typer.Exit(1)
    if result.status == "cancelled":
        raise typer.Exit(130)


@app.command()
def export(
    spec_path: SpecArg,
    weights: Annotated[
        Path, typer.Argument(help="Trained weights (.safetensors).", show_default=False)
    ],
    fmt: Annotated[str, typer.Option("--format", "-f", help="pt2 (torch.export) or onnx.")] = "pt2",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file.")] = None,
    input_shape: InputShapeOpt = None,
) -> None:
    """Export trained weights as a deployable model whose outputs match PyTorch's."""
    from worker.engine.export import ExportError, export_model

    if fmt not in ("pt2", "onnx"):
        raise _fail(f"--format: expected pt2 or onnx, found {fmt!r}")
    spec = _load_spec(spec_path)
    inputs, _ = _fields(spec, spec_path, input_shape)
    target = out or weights.with_suffix(f".{fmt}")
    try:
        export_model(spec, inputs, weights, target, fmt)  # type: ignore[arg-type]
    except (ExportError, SpecError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"wrote {target} ({target.stat().st_size:,} bytes; outputs match PyTorch)")


def _print_result(result: Any, out: Path) -> None:
    if result.status == "failed":
        err.print(f"[red]failed:[/red] {result.error}", highlight=False)
        return
    line = f"{result.status}: {result.epochs_run} epochs, {result.steps} steps"
    if result.best_epoch is not None:
        line += f"; best {result.monitor} = {result.best_value:.6g} at epoch {result.best_epoch}"
    if result.stopped_early:
        line += f"; stopped early: {result.stop_reason}"
    console.print(line, highlight=False)
    console.print(f"run folder: {out}", highlight=False)


class _ProgressBar(Callback):
    """A rich progress bar fed by the trainer's callback hooks (no device syncs)."""

    name = "progress"

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: Any = None

    def on_fit_start(self, trainer: Any) -> None:
        total = trainer.steps_per_epoch * trainer.spec.training.epochs
        if trainer.spec.training.max_steps:
            total = min(total, trainer.spec.training.max_steps)
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=total, completed=trainer.step, epoch=f"{trainer.epoch}", info=""
        )

    def on_batch_end(self, trainer: Any) -> None:
        self.progress.update(
            self.task,
            completed=trainer.step,
            epoch=f"{trainer.epoch} of {trainer.spec.training.epochs}",
        )

    def on_log(self, trainer: Any, points: list[Any]) -> None:
        loss = next((p.value for p in points if p.name == "loss_step"), None)
        if loss is not None:
            self.progress.update(self.task, info=f"loss {loss:.4f}")

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        shown = {
            k: v for k, v in metrics.items() if k not in ("epoch_time_s", "samples_per_s", "lr")
        }
        text = "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
        self.progress.console.print(f"epoch {epoch}: {text}", highlight=False)

    def close(self) -> None:
        self.progress.stop()


# ------------------------------------------------------------------ service


@app.command()
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
    # Open SSE streams would otherwise hold a shutdown until they end.
    config = uvicorn.Config(
        create_app(settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=1
    )
    try:
        _workers_first_server()(config, procs).run()
    finally:
        _stop_workers(procs)


# A stopping worker hands its job back within worker.task.STOP_GRACE_S (3 s), then
# Celery shuts down; serve must be gone within 5 s of Ctrl-C.
WORKERS_STOP_S = 3.5


def _stop_workers(procs: list[Any]) -> None:
    """SIGTERM (a warm shutdown: the running job is handed back), then SIGKILL if need be.

    A killed worker's training child dies with it (worker.task._die_with_parent)."""
    import subprocess
    import time

    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + WORKERS_STOP_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _workers_first_server() -> Any:
    import threading

    import uvicorn

    class WorkersFirst(uvicorn.Server):
        """On SIGINT/SIGTERM, stops the workers before the API: their last reports and
        the release of their jobs need the API. A second Ctrl-C stops at once."""

        def __init__(self, config: Any, procs: list[Any]):
            super().__init__(config)
            self.procs = procs
            self.stopping: threading.Thread | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.stopping is not None:
                super().handle_exit(sig, frame)
                return

            def workers_then_api() -> None:
                _stop_workers(self.procs)
                super(WorkersFirst, self).handle_exit(sig, None)

            self.stopping = threading.Thread(target=workers_then_api, daemon=True)
            self.stopping.start()

    return WorkersFirst


def _die_with_parent() -> None:
    """Linux: a worker started by `serve` gets SIGTERM when serve dies, even by SIGKILL."""
    import contextlib
    import ctypes
    import signal

    # Not Linux: no libc.so.6, and serve's own shutdown still stops its workers.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@app.command("worker")
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


def _client() -> Any:
    from app.client import ApiClient

    return ApiClient()


def _api_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from app.client import ApiError

    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        raise _fail(exc.lines) from None


@app.command()
def upload(
    path: Annotated[Path, typer.Argument(help="A .npz .npy .csv or .parquet file.")],
) -> None:
    """Upload a dataset; prints its id and fields."""
    if not path.is_file():
        raise _fail(f"{path}: no such file")
    info = _api_call(_client().upload, path)
    console.print(
        f"{info['id']}  {info['name']}  {info['rows']} rows  {info['size']:,} bytes",
        highlight=False,
    )
    for field_name, meta in info.get("fields", {}).items():
        console.print(
            f"  {field_name}: {meta.get('dtype')} {tuple(meta.get('shape', []))}", highlight=False
        )


@app.command()
def submit(
    spec_path: SpecArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream progress until the job ends.")
    ] = False,
) -> None:
    """Submit a job spec (dataset ids in data.train / data.validation); prints the job id."""
    try:
        document = json.loads(spec_path.read_text())
    except (OSError, ValueError) as exc:
        raise _fail(f"{spec_path}: {exc}") from None
    client = _client()
    job = _api_call(client.submit, document)
    console.print(f"{job['id']}  {job['status']}", highlight=False)
    if follow:
        _follow(client, job["id"])


def _follow(client: Any, job_id: str) -> None:
    """A live progress bar fed by the job's server-sent events."""
    progress = Progress(
        TextColumn("{task.fields[status]}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    final: dict[str, Any] = {}
    with progress:
        task = progress.add_task("job", total=None, status="queued", epoch="-", info="")
        for _, kind, data in _api_call(lambda: list_events(client, job_id)):
            if kind == "status":
                progress.update(task, status=data.get("status", ""))
            elif kind == "progress" or (kind == "status" and "progress" in data):
                _show_progress(progress, task, data.get("progress", data))
            elif kind == "metrics":
                latest = {p["name"]: p["value"] for p in data.get("points", [])}
                shown = {
                    k: v
                    for k, v in latest.items()
                    if k in ("loss_step", "loss", "val_loss", "val_accuracy", "accuracy")
                }
                if shown:
                    progress.update(task, info="  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
                if "progress" in data:
                    _show_progress(progress, task, data["progress"])
            elif kind == "log":
                for line in data.get("lines", []):
                    progress.console.print(line, highlight=False)
            elif kind == "end":
                final = data
    job = _api_call(client.job, job_id)
    _print_job(job)
    if (final.get("status") or job["status"]) != "succeeded":
        raise typer.Exit(1)


def list_events(client: Any, job_id: str) -> Any:
    yield from client.events(job_id)


def _show_progress(progress: Any, task: Any, p: dict[str, Any]) -> None:
    if not p:
        return
    total = (p.get("steps_per_epoch") or 0) * (p.get("epochs") or 0)
    progress.update(
        task,
        total=total or None,
        completed=p.get("step", 0),
        epoch=f"{p.get('epoch', 0)}/{p.get('epochs', '?')}",
    )


def _print_job(job: dict[str, Any]) -> None:
    line = f"{job['id']}  {job['name']}  {job['status']}"
    best = job.get("best") or {}
    if best.get("epoch") is not None:
        line += f"  best {best['monitor']} = {best['value']:.6g} at epoch {best['epoch']}"
    if job.get("stopped_early"):
        line += f"  stopped early: {job.get('stop_reason')}"
    if job.get("error"):
        line += f"  error: {job['error']}"
    console.print(line, highlight=False)


@app.command()
def jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
) -> None:
    """List your jobs, newest first."""
    page = _api_call(_client().jobs, status, limit)
    for job in page.get("jobs", []):
        _print_job(job)


@app.command()
def status(job_id: str) -> None:
    """Show a job: status, progress, latest and best metrics."""
    job = _api_call(_client().job, job_id)
    _print_job(job)
    progress = job.get("progress") or {}
    if progress:
        console.print(
            f"  epoch {progress.get('epoch')}/{progress.get('epochs')}  step {progress.get('step')}"
            + (f"  eta {progress['eta_s']:.0f}s" if progress.get("eta_s") else ""),
            highlight=False,
        )
    for name, value in sorted((job.get("metrics") or {}).items()):
        console.print(f"  {name} = {value:.6g}", highlight=False)


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job (a running one stops within one heartbeat; its best checkpoint stays)."""
    job = _api_call(_client().cancel, job_id)
    console.print(f"{job_id}  {job.get('status', 'cancel requested')}", highlight=False)


@app.command()
def metrics(
    job_id: str,
    names: Annotated[str | None, typer.Option(help="Comma-separated metric names.")] = None,
    max_points: Annotated[
        int | None, typer.Option(help="Downsample each series to this many points.")
    ] = None,
) -> None:
    """Print a job's metric history as JSON."""
    data = _api_call(_client().metrics, job_id, names.split(",") if names else None, max_points)
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.command()
def download(
    job_id: str,
    fmt: Annotated[
        str | None, typer.Option("--format", help="pt2 or onnx (default: safetensors weights).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file.")] = None,
) -> None:
    """Download a job's best weights (or an exported model)."""
    target = out or Path(f"{job_id}.{fmt or 'safetensors'}")
    _api_call(_client().download, job_id, target, fmt)
    console.print(f"wrote {target} ({target.stat().st_size:,} bytes)", highlight=False)


token_app = typer.Typer(help="Manage API tokens (admin).", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(name: Annotated[str, typer.Argument(help="The user the token is for.")]) -> None:
    """Create a user (if new) and a token for them; prints the token once."""
    from app.config import get_settings
    from app.db import make_engine, make_sessions, session_scope
    from app.migrate import upgrade_engine
    from app.store import users

    settings = get_settings()
    engine = make_engine(settings.database_url)
    upgrade_engine(engine)
    with session_scope(make_sessions(engine)) as session:
        user = users.get_by_name(session, name) or users.create_user(session, name)
        raw = users.create_token(session, user, name="cli")
    engine.dispose()
    sys.stdout.write(raw + "\n")


if __name__ == "__main__":
    main()
