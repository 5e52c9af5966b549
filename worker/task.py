"""What a worker does with one job id: claim, fetch, train in a child process, report.

Training runs in a child process so a segfault, an OOM kill or a cancel ends
that job and not the worker. The parent only moves reports and heartbeats.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import tenacity

from worker.client import ApiUnavailable, NotClaimable, StaleAttempt, WorkerClient
from worker.reporting import ProgressToQueue, QueueReporter, Uploader
from worker.settings import WorkerSettings

log = logging.getLogger("torchyard.worker")

FORMAT_SUFFIX = {"npz": ".npz", "npy": ".npy", "csv": ".csv", "parquet": ".parquet"}
FINISH_RETRY_S = 600.0


def train_in_child(
    spec_doc: dict[str, Any],
    run_dir: str,
    datasets: dict[str, str],
    resume: bool,
    outbox: Any,
    cancel: Any,
) -> None:
    """Entry point of the training child (spawned: no state shared with the parent)."""
    from worker.engine.spec import parse_spec
    from worker.engine.train import run_job

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    spec = pin_to_worker_gpu(parse_spec(spec_doc), os.environ.get("TORCHYARD_GPU"))
    path = Path(run_dir)
    result = run_job(
        spec,
        path,
        resolve=lambda ref: Path(datasets[ref]),
        reporter=QueueReporter(outbox, cancel, path),
        callbacks=[ProgressToQueue(outbox)],
        resume=resume,
    )
    if result.error:
        outbox.put(("log", [f"failed: {result.error}"]))
    outbox.put(("result", result.as_dict()))


def pin_to_worker_gpu(spec: Any, gpu: str | None) -> Any:
    """A worker started with `--gpu N` sees only that GPU, as cuda:0: `cuda:N` means it."""
    if gpu is None or not spec.training.device.startswith("cuda"):
        return spec
    training = spec.training.model_copy(update={"device": "cuda"})
    return spec.model_copy(update={"training": training})


def run_claimed_job(job_id: str, settings: WorkerSettings) -> str:
    """Run one job to the end; returns a word for Celery's log. Never raises for a job's failure."""
    worker_name = f"{settings.worker_name}:{os.getpid()}"
    client = WorkerClient(
        settings.api_url, settings.worker_token, timeout=settings.request_timeout_s
    )
    try:
        claim = client.claim(job_id, worker_name)
    except NotClaimable:
        return "not claimable"
    except ApiUnavailable as exc:
        log.warning("job %s: cannot claim (%s); the API will send it again", job_id, exc)
        return "api unavailable"
    finally:
        client.close()

    api = WorkerClient(settings.api_url, claim.token, timeout=settings.request_timeout_s)
    run_dir = settings.resolved_work_dir / "jobs" / job_id / f"attempt-{claim.attempt}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        try:
            datasets = fetch_datasets(api, claim.datasets, settings.resolved_work_dir / "datasets")
            resume = fetch_resume(api, claim.resume_url, run_dir)
        except StaleAttempt:
            return "stale"
        except (ApiUnavailable, RuntimeError, OSError) as exc:
            _finish(api, job_id, "failed", {"error": f"could not fetch the job's data: {exc}"})
            return "failed"
        return _supervise(api, claim, run_dir, datasets, resume, settings)
    finally:
        api.close()
        shutil.rmtree(run_dir / "outbox", ignore_errors=True)


def fetch_datasets(
    api: WorkerClient, datasets: dict[str, dict[str, Any]], cache: Path
) -> dict[str, str]:
    """Download each dataset once per machine: the cache is keyed by sha256."""
    paths: dict[str, str] = {}
    for ref, meta in datasets.items():
        suffix = Path(meta.get("filename", "")).suffix or FORMAT_SUFFIX.get(
            meta.get("format", ""), ""
        )
        target = cache / f"{meta['sha256']}{suffix}"
        if not target.exists():
            api.download(meta["url"], target, meta["sha256"])
        paths[ref] = str(target)
    return paths


def fetch_resume(api: WorkerClient, url: str | None, run_dir: Path) -> bool:
    if not url:
        return False
    try:
        api.download(url, run_dir / "last.pt")
    except FileNotFoundError:
        return False
    return True


def _supervise(
    api: WorkerClient,
    claim: Any,
    run_dir: Path,
    datasets: dict[str, str],
    resume: bool,
    settings: WorkerSettings,
) -> str:
    context = multiprocessing.get_context("spawn")
    outbox = context.Queue()
    cancel = context.Event()
    child = context.Process(
        target=train_in_child,
        args=(claim.spec, str(run_dir), datasets, resume, outbox, cancel),
        name=f"torchyard-train-{claim.job_id}",
        daemon=True,
    )
    child.start()
    uploader = Uploader(
        api,
        claim.job_id,
        outbox,
        cancel,
        spill_dir=run_dir / "spill",
        lease_s=claim.lease_s,
        buffer_points=settings.report_buffer_points,
    )
    cancel_sent_at: float | None = None
    while child.is_alive():
        uploader.drain(timeout=0.2)
        uploader.pump()
        if uploader.stale:
            child.kill()
            break
        if cancel.is_set() and cancel_sent_at is None:
            cancel_sent_at = time.monotonic()
        # A child that ignores a cancel (stuck in a long op) is ended after a grace period.
        if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > 60:
            child.kill()
    child.join(timeout=10)
    uploader.drain(timeout=0.5)
    if uploader.stale:
        return "stale"

    if uploader.result is not None:
        result = uploader.result
        status = result["status"]
    else:
        status = "failed"
        result = {"error": _death_reason(child.exitcode)}
        if cancel.is_set():
            status, result = "cancelled", {"error": None}

    deadline = time.monotonic() + FINISH_RETRY_S
    while not uploader.idle and not uploader.stale and time.monotonic() < deadline:
        uploader.pump(flush=True)
        uploader.drain(timeout=0.2)
    if uploader.stale:
        return "stale"
    return _finish(api, claim.job_id, status, result, deadline)


def _finish(
    api: WorkerClient,
    job_id: str,
    status: str,
    result: dict[str, Any],
    deadline: float | None = None,
) -> str:
    deadline = deadline or time.monotonic() + FINISH_RETRY_S
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(ApiUnavailable),
        wait=tenacity.wait_exponential(multiplier=0.5, max=10.0),  # 0.5 s, 1 s, ... 10 s
        # the deadline is the caller's (shared with draining the reports); tenacity < 8.2
        # passes the state by keyword, hence its name
        stop=lambda retry_state: time.monotonic() > deadline,
        reraise=True,
    )
    try:
        retrying(api.finish, job_id, status, result)
        return status
    except StaleAttempt:
        return "stale"
    except ApiUnavailable:
        log.error("job %s: API unreachable; leaving it to the lease reconciler", job_id)
        return "unreported"


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"training process was killed by {name}{hint}"
    return f"training process exited with code {exitcode} before reporting a result"
