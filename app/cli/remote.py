"""The REST API's client commands: upload, submit, jobs, status, cancel, metrics, download.

Every call goes through `app.client.ApiClient` (TORCHYARD_URL, TORCHYARD_TOKEN).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from app.cli.terminal import SpecArg, console, fail


def _client() -> Any:
    from app.client import ApiClient

    return ApiClient()


def _api_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from app.client import ApiError

    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        raise fail(exc.lines) from None


def upload(
    path: Annotated[Path, typer.Argument(help="A .npz .npy .csv or .parquet file.")],
) -> None:
    """Upload a dataset; prints its id and fields."""
    if not path.is_file():
        raise fail(f"{path}: no such file")
    info = _api_call(_client().upload, path)
    console.print(
        f"{info['id']}  {info['name']}  {info['rows']} rows  {info['size']:,} bytes",
        highlight=False,
    )
    for field_name, meta in info.get("fields", {}).items():
        console.print(
            f"  {field_name}: {meta.get('dtype')} {tuple(meta.get('shape', []))}", highlight=False
        )


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
        raise fail(f"{spec_path}: {exc}") from None
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
        for _, kind, data in _api_stream(client.events(job_id)):
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


def _api_stream(items: Iterator[Any]) -> Iterator[Any]:
    """_api_call for a stream: an ApiError part-way through ends the command the same way."""
    from app.client import ApiError

    try:
        yield from items
    except ApiError as exc:
        raise fail(exc.lines) from None


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


def jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
) -> None:
    """List your jobs, newest first."""
    page = _api_call(_client().jobs, status, limit)
    for job in page.get("jobs", []):
        _print_job(job)


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


def cancel(job_id: str) -> None:
    """Cancel a job (a running one stops within one heartbeat; its best checkpoint stays)."""
    job = _api_call(_client().cancel, job_id)
    console.print(f"{job_id}  {job.get('status', 'cancel requested')}", highlight=False)


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
