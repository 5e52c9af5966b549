"""Engine commands on this machine: schema, validate, train, export (no service needed)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from app.cli.terminal import SpecArg, console, err, fail
from worker.engine.errors import DataError, SpecError

if TYPE_CHECKING:  # the engine's training modules import torch: only when training
    from worker.engine.callbacks import Callback

InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Per-sample shape of an input, NAME=D1,D2,... (no batch dim); repeat for several. "
        "Replaces reading the dataset.",
    ),
]


def _load_spec(path: Path) -> Any:
    return _parse(_read_spec(path))


def _read_spec(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None


def _parse(document: bytes) -> Any:
    from worker.engine.spec import parse_spec

    try:
        return parse_spec(document)
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
        max_params: int = Settings.model_fields["max_params"]  # type: ignore[assignment]

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
    ranks = _ranks_summary(spec)
    if as_json:
        sys.stdout.write(json.dumps({**built.summary.as_dict(), **ranks}, indent=2) + "\n")
    else:
        console.print(built.summary.render())
        console.print(_ranks_line(spec, ranks), highlight=False)


def _ranks_summary(spec: Any) -> dict[str, Any]:
    """How the run is split: the world size and each rank's share of the global batch."""
    res = spec.resources
    return {
        "world_size": res.world_size,
        "nodes": res.nodes,
        "ranks_per_node": res.ranks_per_node,
        "backend": None if res.world_size == 1 else "nccl" if res.gpu_ranks else "gloo",
        "batch_size": spec.data.batch_size,
        "batch_per_rank": spec.data.batch_size // res.world_size,
    }


def _ranks_line(spec: Any, ranks: dict[str, Any]) -> str:
    if ranks["world_size"] == 1:
        return f"world size 1 (one process); batch {ranks['batch_size']}"
    kind = "GPU" if spec.resources.gpu_ranks else "CPU process"
    return (
        f"world size {ranks['world_size']} ({ranks['ranks_per_node']} {kind} rank(s) x "
        f"{ranks['nodes']} node(s), {ranks['backend']}); batch {ranks['batch_size']} global, "
        f"{ranks['batch_per_rank']} per rank"
    )


def train(
    spec_path: SpecArg,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder for metrics and checkpoints.")
    ],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a spec on this machine; write metrics.jsonl, best.safetensors, last.pt, result.json.

    With `resources.processes` or `resources.gpus` above 1, one rank per process or GPU
    (torch's elastic agent, as torchrun); more than one node is the service's to run."""
    from app.cli.progress_bar import ProgressBar
    from worker.engine.train import run_job

    document = _read_spec(spec_path)
    spec = _parse(document)
    res = spec.resources
    if res.world_size == 1:
        callbacks: list[Callback] = [] if quiet else [ProgressBar(console)]
        result = run_job(
            spec,
            out,
            resolve=_resolver(spec_path),
            callbacks=callbacks,
            resume=resume,
            max_params=_max_params(),
        )
    elif res.nodes > 1:
        raise fail(
            f"resources.nodes {res.nodes}: `torchyard train` runs one node; start each node "
            f"under torchrun, or submit the job to a service"
        )
    else:
        from worker.engine.launch import launch_ranks

        # The document as written, not `spec.dump()`: which defaults were given matters
        # (model.init's bias applies only beside a weight init that was set).
        args = (document, str(out), str(spec_path), resume, _max_params(), quiet)
        result = launch_ranks(_train_rank, args, nproc=res.world_size, run_dir=out)
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


def _train_rank(
    document: bytes,
    out: str,
    spec_path: str,
    resume: bool,
    max_params: int,
    quiet: bool,
) -> Any:
    """One rank of a data-parallel `train`, spawned by the launcher (plain arguments)."""
    from app.cli.progress_bar import ProgressBar
    from worker.engine.distributed import Ranks
    from worker.engine.spec import parse_spec
    from worker.engine.train import run_job

    show = not quiet and Ranks.from_env().is_zero  # one progress bar: rank 0's
    return run_job(
        parse_spec(document),
        Path(out),
        resolve=_resolver(Path(spec_path)),
        callbacks=[ProgressBar(console)] if show else [],
        resume=resume,
        max_params=max_params,
    )


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
        if getattr(result, "lost", False) and (out / "last.pt").exists():
            err.print(f"continue it from its last checkpoint with --resume (run folder: {out})")
        return
    line = f"{result.status}: {result.epochs_run} epochs, {result.steps} steps"
    if result.best_epoch is not None and result.best_value is not None:
        line += f"; best {result.monitor} = {result.best_value:.6g} at epoch {result.best_epoch}"
    if result.stopped_early:
        line += f"; stopped early: {result.stop_reason}"
    console.print(line, highlight=False)
    console.print(f"run folder: {out}", highlight=False)
