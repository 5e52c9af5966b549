"""What a worker does with one job id: claim, fetch, train in a child process, report.

Training runs in a child process so a segfault, an OOM kill or a cancel ends
that job and not the worker. The parent only moves reports and heartbeats.

Lifecycle: the child dies with the worker, however the worker dies
(`die_with_parent`). A worker told to stop (SIGTERM, or Ctrl-C: Celery's warm
shutdown calls `request_stop`) does not wait for the job to end: it sends the
child SIGTERM, the child saves a mid-epoch `last.pt` at its next optimizer step
and exits, the parent uploads it and releases the job (`queued` at once; the
next worker resumes it bit-exactly), all within `STOP_GRACE_S`. A data-parallel
job's child starts the ranks and is their agent (`worker/ranks.py`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import tenacity

from worker.client import ApiUnavailable, NotClaimable, StaleAttempt, WorkerClient
from worker.settings import WorkerSettings
from worker.uploader import Uploader

log = logging.getLogger("torchyard.worker")

FORMAT_SUFFIX = {"npz": ".npz", "npy": ".npy", "csv": ".csv", "parquet": ".parquet"}
FINISH_RETRY_S = 600.0
# How long node 0 of a gang waits for a failed peer node's own report (_ended_by_another_node).
PEER_REPORT_GRACE_S = 5.0
# From the stop signal to the job released. `serve` and `worker` must be gone within
# 5 s of SIGINT or SIGTERM, and Docker sends SIGKILL 10 s after SIGTERM; the rest is
# Celery's own shutdown.
STOP_GRACE_S = 3.0
# How long the child gets to reach its next optimizer step and save; then it is
# killed and the job resumes from its last epoch's checkpoint instead.
PREEMPT_GRACE_S = 2.0
RELEASE_TIMEOUT_S = 1.0
STOPPING = "stopping"
GANG_POLL_S = 0.5
PR_SET_PDEATHSIG = 1


class _StopRequest:
    """Set once when the worker shuts down. Set from a signal handler: plain attributes only."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.reason = ""

    def __bool__(self) -> bool:
        return self.at is not None


stop_requested = _StopRequest()


def request_stop(reason: str) -> None:
    """The worker is shutting down: its running job is preempted and handed back.

    Safe to call from a signal handler (no locks, no logging)."""
    if stop_requested.at is None:
        stop_requested.reason, stop_requested.at = reason, time.monotonic()


def train_in_child(
    spec_doc: dict[str, Any],
    run_dir: str,
    datasets: dict[str, str],
    resume: bool,
    outbox: Any,
    cancel: Any,
    parent_pid: int | None = None,
    place: dict[str, Any] | None = None,
) -> None:
    """Entry point of the training child (spawned: no state shared with the parent).

    Ends the process itself once its reports are flushed (`_exit_now`)."""
    die_with_parent(parent_pid or os.getppid())
    # A spawned process inherits "spawn" as its default start method: the DataLoader's
    # workers would each import torch anew and get the dataset pickled (seconds, and a
    # copy per worker). Back to this platform's default (fork on Linux), as in any run.
    multiprocessing.set_start_method(None, force=True)
    # Ctrl-C reaches the whole process group: the parent decides when we stop. DataLoader
    # workers forked from here inherit the ignored SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    preempt = threading.Event()  # SIGTERM from the parent: save a mid-epoch last.pt, exit
    signal.signal(signal.SIGTERM, lambda *_: preempt.set())
    try:
        # Here, not at the top: the worker parent imports this module and stays
        # without torch (3 to 4 s and ~200 MB a worker); the child trains with it.
        from worker.engine.spec import parse_spec
        from worker.engine.train import run_job
        from worker.reporting import ProgressToQueue, QueueReporter

        spec = pin_to_worker_gpu(parse_spec(spec_doc), os.environ.get("TORCHYARD_GPU"))
        path = Path(run_dir)
        if spec.resources.world_size > 1:  # data-parallel: this process is the ranks' agent
            from worker.ranks import train_ranks

            nproc = spec.resources.ranks_per_node
            result = train_ranks(
                spec_doc, run_dir, datasets, resume, outbox, cancel, nproc, place or {}
            )
        else:
            result = run_job(
                spec,
                path,
                resolve=lambda ref: Path(datasets[ref]),
                reporter=QueueReporter(outbox, cancel, path),
                callbacks=[ProgressToQueue(outbox)],
                resume=resume,
                preempt=preempt.is_set,
            )
    except BaseException as exc:
        # Anything run_job let through: one line for the job's error, the traceback
        # for its log (the worker's stderr is not the user's to read).
        error = f"training process failed: {type(exc).__name__}: {_first_line(exc)}"
        outbox.put(("log", [error, *traceback.format_exc().rstrip().splitlines()]))
        outbox.put(("result", {"status": "failed", "error": error}))
        _exit_now(outbox, 1)
    if result.error:
        outbox.put(("log", [f"failed: {result.error}"]))
    outbox.put(("result", result.as_dict()))
    _exit_now(outbox, 0)


def _exit_now(outbox: Any, code: int) -> None:
    """Flush the reports, end our DataLoader workers, and exit without the interpreter's
    teardown: with torch loaded it takes seconds (4 s measured), which a stopping worker
    does not have, and every finished job waited for."""
    children = multiprocessing.active_children()
    for proc in children:
        proc.terminate()
    for proc in children:
        proc.join(timeout=1)
        if proc.is_alive():
            proc.kill()
    outbox.close()
    outbox.join_thread()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "(no message)"


def die_with_parent(parent_pid: int) -> None:
    """End this process when the worker that started it dies, however it dies.

    A training child left behind keeps its GPU busy and reports to nobody, even
    after another worker resumed its job. On Linux the kernel sends SIGKILL the
    moment the parent (the thread that started us) exits, even by SIGKILL; everywhere,
    a thread watches the parent's end of the spawn pipe, which closes when it dies.
    """
    with contextlib.suppress(OSError, AttributeError):  # no prctl: not Linux
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)
    parent = multiprocessing.parent_process()
    if parent is not None and parent.sentinel is not None:
        threading.Thread(
            target=_exit_when_closed, args=(parent.sentinel,), name="parent-watch", daemon=True
        ).start()


def _exit_when_closed(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def pin_to_worker_gpu(spec: Any, gpu: str | None) -> Any:
    """A worker started with `--gpu N` sees only its GPUs (`--gpu 0,1`: a set), the first
    as cuda:0: a one-GPU job's `cuda:N` means that one. Ranks take cuda:LOCAL_RANK."""
    if gpu is None or not spec.training.device.startswith("cuda"):
        return spec
    training = spec.training.model_copy(update={"device": "cuda"})
    return spec.model_copy(update={"training": training})


def run_claimed_job(job_id: str, settings: WorkerSettings) -> str:
    """Run one job to the end; returns a word for Celery's log. Never raises for a job's failure.

    Returns `STOPPING` without claiming when the worker is shutting down: the
    caller hands the message back to the broker for another worker."""
    if stop_requested:
        return STOPPING
    worker_name = f"{settings.worker_name}:{os.getpid()}"
    client = WorkerClient(
        settings.api_url, settings.worker_token, timeout=settings.request_timeout_s
    )
    try:
        claim = client.claim(job_id, worker_name, settings.rendezvous_host, _free_port())
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
        if claim.gang is not None:
            claim.place = _gather(api, claim)
            if claim.place is None:
                return "gang incomplete"
            claim.resume_url = (claim.place.get("resume") or {}).get("url")
        try:
            datasets = fetch_datasets(api, claim.datasets, settings.resolved_work_dir / "datasets")
            resume = fetch_resume(api, claim.resume_url, run_dir)
        except StaleAttempt:
            return "stale"
        except (ApiUnavailable, RuntimeError, OSError) as exc:
            if stop_requested:
                return _release(api, job_id)
            _finish(api, job_id, "failed", {"error": f"could not fetch the job's data: {exc}"})
            return "failed"
        if stop_requested:
            return _release(api, job_id)
        return _supervise(api, claim, run_dir, datasets, resume, settings)
    finally:
        api.close()
        shutil.rmtree(run_dir / "outbox", ignore_errors=True)


def _gather(api: WorkerClient, claim: Any) -> dict[str, Any] | None:
    """Hold this member's claim until the gang is whole (its place) or the API says the
    wait is over (None: the API has dropped the member, so a partial gang frees its
    workers). The API decides, so no member trains in a gang another left; the
    deadline here only covers an API that stopped answering."""
    deadline = time.monotonic() + 2 * float(claim.gang["wait_s"]) + GANG_POLL_S * 10
    while not stop_requested and time.monotonic() < deadline:
        try:
            place = api.gang(claim.job_id)
        except (ApiUnavailable, NotClaimable, StaleAttempt, RuntimeError) as exc:
            log.warning("job %s: gang: %s", claim.job_id, exc)
            place = {"state": "gathering"}
        if place["state"] == "whole":
            log.info("job %s: node %s of %s", claim.job_id, place["member"], place["nodes"])
            return place
        if place["state"] == "gone":
            break
        time.sleep(GANG_POLL_S)
    log.info("job %s: the gang did not gather; claim let go", claim.job_id)
    return None


def _free_port() -> int:
    """A port for the ranks' rendezvous should this worker be a gang's node 0."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


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


def dataset_names(datasets: dict[str, dict[str, Any]], paths: dict[str, str]) -> dict[str, str]:
    """What a job's error calls each fetched file: the name it was uploaded under and its
    dataset id, not the sha256 this worker's cache keeps it by."""
    names = {}
    for ref, path in paths.items():
        filename = datasets[ref].get("filename")
        names[Path(path).name] = f"{filename} (dataset {ref})" if filename else f"dataset {ref}"
    return names


def _named(error: str, names: dict[str, str]) -> str:
    for cached, name in names.items():
        error = error.replace(cached, name)
    return error


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
    # Not daemonic: a daemonic process may not have children, and a DataLoader with
    # num_workers > 0 starts some. It dies with this process all the same
    # (`die_with_parent`), and `_watch` ends it before returning.
    child = context.Process(
        target=train_in_child,
        args=(claim.spec, str(run_dir), datasets, resume, outbox, cancel, os.getpid(), claim.place),
        name=f"torchyard-train-{claim.job_id}",
    )
    names = dataset_names(claim.datasets, datasets)
    child.start()
    try:
        return _watch(api, claim, child, outbox, cancel, run_dir, settings, names)
    finally:
        if child.is_alive():
            child.kill()
        child.join(timeout=10)


def _watch(
    api: WorkerClient,
    claim: Any,
    child: Any,
    outbox: Any,
    cancel: Any,
    run_dir: Path,
    settings: WorkerSettings,
    names: dict[str, str],
) -> str:
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
    preempt_sent_at: float | None = None
    while child.is_alive():
        uploader.drain(timeout=0.1 if stop_requested else 0.2)
        uploader.pump()
        if uploader.stale:
            child.kill()
            break
        if cancel.is_set() and cancel_sent_at is None:
            cancel_sent_at = time.monotonic()
        # A child that ignores a cancel (stuck in a long op) is ended after a grace period.
        if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > 60:
            child.kill()
        if stop_requested and preempt_sent_at is None:
            child.terminate()  # SIGTERM: a mid-epoch last.pt at the next optimizer step
            preempt_sent_at = time.monotonic()
        if preempt_sent_at is not None and time.monotonic() - preempt_sent_at > PREEMPT_GRACE_S:
            child.kill()
    child.join(timeout=10)
    uploader.drain(timeout=0.5)
    if uploader.stale:
        return "stale"
    result = uploader.result
    if stop_requested and (result is None or result["status"] == "preempted"):
        # The worker is stopping, and the job is not over (or the child died of the
        # stop): hand it back, never fail it.
        return _hand_back(api, uploader, claim.job_id)

    if uploader.result is not None:
        result = uploader.result
        status = result["status"]
        if result.get("error"):
            result = {**result, "error": _named(result["error"], names)}
    else:
        status = "failed"
        result = {"error": _death_reason(child.exitcode)}
        if cancel.is_set():
            status, result = "cancelled", {"error": None}

    if claim.place is not None and claim.place["member"] != 0:
        member = claim.place["member"]
        if status == "failed" and not result.get("lost"):
            # This node's own ranks failed (bad data on its disk, a bug): node 0 only
            # sees a peer gone, so this node says why, and the job fails rather than
            # restarting into the same failure.
            error = f"node {member}: {result.get('error') or 'failed'}"
            return _finish(api, claim.job_id, "failed", {**result, "error": error})
        # Node 0 reports the run and finishes the job; this node's ranks only trained.
        log.info("job %s: node %s done (%s)", claim.job_id, member, status)
        return f"node {member} done"

    deadline = time.monotonic() + FINISH_RETRY_S
    uploader.pump(flush=True)  # what is pending, and the run's last progress
    while not uploader.idle and not uploader.stale and time.monotonic() < _until(deadline):
        uploader.pump(flush=True)
        uploader.drain(timeout=0.2)
    if uploader.stale:
        return "stale"
    if status == "failed" and result.get("lost"):
        if claim.place is not None and _ended_by_another_node(uploader):
            return "stale"  # a node whose own ranks failed has failed the job
        # A rank or node of the run died: the attempt is lost, not the job failed. The
        # job restarts (within max_restarts) from the last checkpoint delivered above.
        return _lose(api, claim.job_id, str(result.get("error") or "a rank was lost"), deadline)
    return _finish(api, claim.job_id, status, result, deadline)


def _ended_by_another_node(uploader: Uploader) -> bool:
    """Node 0 lost a peer: wait a moment for that node to fail the job with its own reason.

    A node whose ranks failed (not died) reports the failure itself, at about the
    time node 0 sees the peer gone; reporting the attempt lost first would restart
    the job into the same failure. True when the attempt has ended meanwhile."""
    end = time.monotonic() + PEER_REPORT_GRACE_S
    while not uploader.stale and time.monotonic() < end:
        time.sleep(0.25)
        uploader.heartbeat()
    return uploader.stale


def _hand_back(api: WorkerClient, uploader: Uploader, job_id: str) -> str:
    """Deliver what the child reported (its last.pt first of all), then release the job.

    Within the stop's grace: what is not delivered by then is reported again by
    the attempt that resumes from the last checkpoint the API holds."""
    deadline = (stop_requested.at or time.monotonic()) + STOP_GRACE_S - RELEASE_TIMEOUT_S
    while not uploader.idle and not uploader.stale and time.monotonic() < deadline:
        uploader.pump(flush=True)
        uploader.drain(timeout=0.05)
    if uploader.stale:
        return "stale"
    if not uploader.idle:
        log.warning("job %s: stopping before every report was delivered", job_id)
    return _release(api, job_id)


def _release(api: WorkerClient, job_id: str) -> str:
    """Queued at once, for the next worker; a lost release leaves it to the lease."""
    try:
        api.release(job_id, stop_requested.reason or "worker stopping", timeout=RELEASE_TIMEOUT_S)
    except StaleAttempt:
        return "stale"
    except (ApiUnavailable, RuntimeError) as exc:
        log.warning("job %s: could not release it (%s); its lease will run out", job_id, exc)
        return "unreleased"
    log.info("job %s: released (%s)", job_id, stop_requested.reason)
    return "released"


def _finish(
    api: WorkerClient,
    job_id: str,
    status: str,
    result: dict[str, Any],
    deadline: float | None = None,
) -> str:
    deadline = deadline or time.monotonic() + FINISH_RETRY_S
    try:
        _retrying(deadline)(api.finish, job_id, status, result)
        return status
    except StaleAttempt:
        return "stale"
    except ApiUnavailable:
        log.error("job %s: API unreachable; leaving it to the lease reconciler", job_id)
        return "unreported"


def _lose(api: WorkerClient, job_id: str, reason: str, deadline: float) -> str:
    """Report the attempt lost: the API restarts the job (or fails it past max_restarts)."""
    try:
        _retrying(deadline)(api.release, job_id, reason[:200], lost=True)
    except StaleAttempt:
        return "stale"
    except ApiUnavailable:
        log.error("job %s: API unreachable; leaving it to the lease reconciler", job_id)
        return "unreported"
    log.warning(
        "job %s: attempt lost (%s); the job restarts from its last checkpoint", job_id, reason
    )
    return "lost"


def _retrying(deadline: float) -> tenacity.Retrying:
    """Retries of a call to an API that is down, until `deadline` (or a stop's grace)."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(ApiUnavailable),
        wait=tenacity.wait_exponential(multiplier=0.5, max=10.0),  # 0.5 s, 1 s, ... 10 s
        # the deadline is the caller's (shared with draining the reports), and a stop
        # may shorten it meanwhile; tenacity < 8.2 passes the state by keyword
        stop=lambda retry_state: time.monotonic() > _until(deadline),
        # short naps: a stop may come meanwhile
        sleep=_nap_until(deadline),
        reraise=True,
    )


def _until(deadline: float) -> float:
    """A stopping worker gives up within the stop's grace; the lease does the rest."""
    if stop_requested.at is None:
        return deadline
    return min(deadline, stop_requested.at + STOP_GRACE_S)


def _nap_until(deadline: float) -> Any:
    """tenacity's sleep between tries, in short naps that end early when a stop comes."""

    def sleep(seconds: float) -> None:
        wake = time.monotonic() + seconds
        while time.monotonic() < min(wake, _until(deadline)):
            time.sleep(0.1)

    return sleep


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"training process was killed by {name}{hint}"
    return f"training process exited with code {exitcode} before reporting a result"
