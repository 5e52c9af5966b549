"""Engine commands on this machine: schema, validate, train, export (no service needed)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from app.cli.terminal import SpecArg, console, err, fail
from worker.engine.callbacks import Callback
from worker.engine.errors import DataError, SpecError

InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Per-sample shape of an input, NAME=D1,D2,... (no batch dim); repeat for several. "
        "Replaces reading the dataset.",
    ),
]


def _load_spec(path: Path) -> Any:
    from worker.engine.spec import parse_spec

    try:
        text = path.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    try:
        return parse_spec(text)
    except SpecError as exc:
        raise fail([str(issue) for issue in exc.issues]) from None


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
            raise fail(
                f"--input-shape {value!r}: expected NAME=D1,D2,... with integer sizes"
            ) from None
        if name not in fields:
            raise fail(
                f"--input-shape {value!r}: unknown input {name!r} (inputs: {', '.join(fields)})"
            )
        out[name] = FieldInfo(shape=shape, dtype="float32")
    missing = [name for name in fields if name not in out]
    if missing:
        raise fail(f"--input-shape missing for input(s): {', '.join(missing)}")
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
        raise fail([str(issue) for issue in exc.issues]) from None
    except (DataError, OSError) as exc:
        raise fail(f"data.train: {exc} (or give --input-shape to validate without data)") from None


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
        raise fail(f"TORCHYARD_MAX_PARAMS: {error['msg']}, found {error.get('input')!r}") from None


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
        raise fail([str(issue) for issue in exc.issues]) from None
    if as_json:
        sys.stdout.write(json.dumps(built.summary.as_dict(), indent=2) + "\n")
    else:
        console.print(built.summary.render())


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
    _print_result(result, out)
    _exit_now({"failed": 1, "cancelled": 130}.get(result.status, 0))


def _exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown: with torch loaded it takes
    seconds (1 to 4 s measured, more on a busy machine), which every local run waited
    for after its last line; the worker's training child ends the same way
    (worker/task.py). Everything the run wrote is closed by now (the run's files are
    written whole, then renamed); the output streams are flushed here."""
    for child in multiprocessing.active_children():  # DataLoader workers, if any
        child.terminate()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


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
        raise fail(f"--format: expected pt2 or onnx, found {fmt!r}")
    spec = _load_spec(spec_path)
    inputs, _ = _fields(spec, spec_path, input_shape)
    target = out or weights.with_suffix(f".{fmt}")
    try:
        export_model(spec, inputs, weights, target, fmt)  # type: ignore[arg-type]
    except (ExportError, SpecError) as exc:
        raise fail(str(exc)) from None
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

    def on_fit_end(self, trainer: Any) -> None:
        self.progress.stop()
