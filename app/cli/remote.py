"""The REST API's client commands: upload, submit, jobs, status, cancel, metrics, download,
rm, projects, tag, note.

Every call goes through `torchyard.Client` (TORCHYARD_URL, TORCHYARD_TOKEN), the one
client of the user API, which scripts and notebooks import too.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from app.cli.terminal import SpecArg, console, err, fail

if TYPE_CHECKING:
    from torchyard import Client, Job


def _client() -> Client:
    from torchyard import Client

    return Client()


def _api_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from torchyard import TorchyardError

    try:
        return fn(*args, **kwargs)
    except TorchyardError as exc:
        raise fail(exc.lines) from None


def _job(job_id: str) -> Job:
    return _api_call(_client().job, job_id)


def upload(
    path: Annotated[Path, typer.Argument(help="A .npz .npy .csv or .parquet file.")],
) -> None:
    """Upload a dataset; prints its id and fields."""
    if not path.is_file():
        raise fail(f"{path}: no such file")
    info = _api_call(_client().datasets.upload, path)
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
    project: Annotated[
        str | None, typer.Option(help="The job's project (sets `project` in what is sent).")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="A tag; repeat for more (sets `tags`).")
    ] = None,
    note: Annotated[str | None, typer.Option(help="A note on the job (sets `note`).")] = None,
) -> None:
    """Submit a job spec; prints the job id.

    Datasets may be dataset ids or local files (relative to the spec's folder, as for
    `train`): a file the service does not hold yet (by sha256) is uploaded first. The
    spec file itself is never changed.
    """
    client = _client()
    job = _api_call(client.submit, spec_path, project=project, tags=tag, note=note)
    console.print(f"{job.id}  {job.status}", highlight=False)
    if follow:
        _follow(job)


def _follow(job: Job) -> None:
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
        for _, kind, data in _api_stream(job.follow()):
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
    _api_call(job.refresh)
    _print_job(job.info)
    if (final.get("status") or job.status) != "succeeded":
        raise typer.Exit(1)


def _api_stream(items: Iterator[Any]) -> Iterator[Any]:
    """_api_call for a stream: an ApiError part-way through ends the command the same way."""
    from torchyard import TorchyardError

    try:
        yield from items
    except TorchyardError as exc:
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
    if job.get("project") not in (None, "default"):
        line += f"  [{job['project']}]"
    if job.get("tags"):
        line += "  " + " ".join(f"#{t}" for t in job["tags"])
    best = job.get("best") or {}
    if best.get("epoch") is not None:
        # a value may be missing (not finite, or not reported yet): the epoch still shows
        value = "?" if best.get("value") is None else f"{best['value']:.6g}"
        line += f"  best {best['monitor']} = {value} at epoch {best['epoch']}"
    if job.get("stopped_early"):
        line += f"  stopped early: {job.get('stop_reason')}"
    if job.get("error"):
        line += f"  error: {job['error']}"
    console.print(line, highlight=False)


def jobs(
    project: Annotated[str | None, typer.Option(help="Only jobs of this project.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only jobs with this tag.")] = None,
    status: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    name: Annotated[str | None, typer.Option(help="Only jobs whose name contains this.")] = None,
    limit: Annotated[int, typer.Option(help="How many.", min=1)] = 20,
) -> None:
    """List your jobs, newest first."""
    found = _client().jobs(
        project=project, tag=tag, status=status, name=name, page_size=min(limit, 200)
    )
    for job in _api_stream(itertools.islice(found, limit)):
        _print_job(job.info)


def status(job_id: str) -> None:
    """Show a job: status, progress, latest and best metrics, where its datasets came from."""
    job = _job(job_id).info
    _print_job(job)
    progress = job.get("progress") or {}
    if progress:
        console.print(
            f"  epoch {progress.get('epoch')}/{progress.get('epochs')}  step {progress.get('step')}"
            + (f"  eta {progress['eta_s']:.0f}s" if progress.get("eta_s") else ""),
            highlight=False,
        )
    for name, value in sorted((job.get("metrics") or {}).items()):
        shown = "nan" if value is None else f"{value:.6g}"  # the API shows NaN/inf as null
        console.print(f"  {name} = {shown}", highlight=False)
    for where, source in sorted((job.get("dataset_sources") or {}).items()):
        console.print(f"  {where} from {source}", highlight=False)
    if job.get("note"):
        console.print(f"  note: {job['note']}", highlight=False)


def cancel(job_id: str) -> None:
    """Cancel a job (a running one stops within one heartbeat; its best checkpoint stays)."""
    job = _api_call(_job(job_id).cancel)
    console.print(f"{job_id}  {job.status}", highlight=False)


def metrics(
    job_id: str,
    names: Annotated[str | None, typer.Option(help="Comma-separated metric names.")] = None,
    max_points: Annotated[
        int | None, typer.Option(help="Downsample each series to this many points.")
    ] = None,
) -> None:
    """Print a job's metric history as JSON."""
    data = _api_call(_job(job_id).metrics, names.split(",") if names else None, max_points)
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def download(
    job_id: str,
    fmt: Annotated[
        str | None, typer.Option("--format", help="pt2 or onnx (default: safetensors weights).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file.")] = None,
) -> None:
    """Download a job's best weights (or an exported model)."""
    target = _api_call(_job(job_id).download, out, format=fmt)
    console.print(f"wrote {target} ({target.stat().st_size:,} bytes)", highlight=False)


def rm(job_ids: Annotated[list[str], typer.Argument(help="Finished jobs to delete.")]) -> None:
    """Delete finished jobs with their metrics and checkpoints (cancel a running one first)."""
    from torchyard import TorchyardError

    client = _client()
    failed = False
    for job_id in job_ids:
        try:
            client.job(job_id).delete()
        except TorchyardError as exc:
            failed = True
            for line in exc.lines:
                err.print(f"[red]error:[/red] {job_id}: {line}", highlight=False, soft_wrap=True)
            continue
        console.print(f"deleted {job_id}", highlight=False)
    if failed:
        raise typer.Exit(1)


def projects() -> None:
    """List your projects and how many jobs each has."""
    for project in _api_call(_client().projects):
        console.print(f"{project['name']}  {project['jobs']} jobs", highlight=False)


def tag(
    job_id: str,
    add: Annotated[
        list[str] | None, typer.Option("--add", help="A tag to add; repeatable.")
    ] = None,
    remove: Annotated[
        list[str] | None, typer.Option("--remove", help="A tag to remove; repeatable.")
    ] = None,
) -> None:
    """Add and remove a job's tags; prints the tags it has then."""
    job = _job(job_id)
    gone = set(remove or [])
    tags = [t for t in job.info.get("tags") or [] if t not in gone]
    tags += [t for t in dict.fromkeys(add or []) if t not in tags and t not in gone]
    _api_call(job.update, tags=tags)
    console.print(
        f"{job_id}  " + " ".join(f"#{t}" for t in job.info.get("tags", tags)), highlight=False
    )


def note(job_id: str, text: Annotated[str, typer.Argument(help='The note; "" clears it.')]) -> None:
    """Set a job's note."""
    _api_call(_job(job_id).update, note=text)
    console.print(f"{job_id}  note set", highlight=False)
