"""A data-parallel job on one worker: the training child is the ranks' elastic agent.

The worker's training child (`worker.task.train_in_child`) runs `launch_ranks`, which
spawns one process per rank (`train_rank`) and watches them. Rank 0 reports through
the child's queue to the worker's Uploader (metrics, checkpoints, logs, the cancel
flag); the other ranks report nowhere (`run_job` gives them a null reporter). The
child posts the one result: rank 0's, or the agent's reason when a rank failed.

Lifecycle, as for a one-process job:
- Each rank dies with the child (`die_with_parent`: SIGKILL from the kernel, and a
  watch on the spawn pipe), and the child dies with the worker, so a killed worker
  leaves no rank behind. torch's own spawn asks for SIGINT on the parent's death,
  which a rank that ignores SIGINT (as ours do) would survive.
- Preemption: the worker's SIGTERM reaches the agent, whose handler (torch's, for
  SIGTERM only here) stops the ranks with SIGTERM and waits for them. Each rank's
  handler asks its trainer to stop; the ranks agree at the next log window, rank 0
  saves a mid-epoch `last.pt` (every rank's RNG state in it), flushes its reports
  and returns; the child reports `preempted` and the worker releases the job.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Any

from worker.engine.train import PREEMPTED, RunResult


def train_ranks(
    spec_doc: dict[str, Any],
    run_dir: str,
    datasets: dict[str, str],
    resume: bool,
    outbox: Any,
    cancel: Any,
    nproc: int,
    place: dict[str, Any],
) -> RunResult:
    """Run the job in `nproc` ranks on this machine; rank 0's result (`preempted` on SIGTERM).

    `place`: this worker's node in a gang (`member`, `nodes`, node 0's `endpoint`,
    `run_id`, from the API); empty for a job of one node."""
    from torch.distributed.elastic.multiprocessing import SignalException

    from worker.engine.launch import launch_ranks

    # torch's agent replaces the handlers of the signals named here: SIGTERM alone, so
    # SIGINT (Ctrl-C reaches the whole process group) stays ignored and the worker
    # decides when the ranks stop.
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGTERM"
    args = (spec_doc, run_dir, datasets, resume, outbox, cancel, os.getpid())
    try:
        return launch_ranks(
            train_rank,
            args,
            nproc=nproc,
            run_dir=Path(run_dir),
            nodes=int(place.get("nodes", 1)),
            node_rank=int(place.get("member", 0)),
            endpoint=place.get("endpoint"),
            run_id=place.get("run_id"),
        )
    except SignalException:
        # The agent stopped the ranks with SIGTERM and waited for them: rank 0 has
        # reported its mid-epoch last.pt (or was killed first, and the job resumes
        # from the last one the API holds).
        return RunResult(status=PREEMPTED, stop_reason=PREEMPTED)


def train_rank(
    spec_doc: dict[str, Any],
    run_dir: str,
    datasets: dict[str, str],
    resume: bool,
    outbox: Any,
    cancel: Any,
    agent_pid: int,
) -> RunResult:
    """One rank (spawned by the agent): train, rank 0 reporting through `outbox`."""
    from worker.engine.distributed import Ranks
    from worker.engine.spec import parse_spec
    from worker.engine.train import run_job
    from worker.reporting import ProgressToQueue, QueueReporter
    from worker.task import die_with_parent

    die_with_parent(agent_pid)
    # Spawned: back to the platform's start method for the DataLoader's workers.
    multiprocessing.set_start_method(None, force=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    preempt = threading.Event()  # SIGTERM from the agent: stop at the next agreed step
    signal.signal(signal.SIGTERM, lambda *_: preempt.set())

    path = Path(run_dir)
    zero = Ranks.from_env().is_zero
    result = run_job(
        parse_spec(spec_doc),
        path,
        resolve=lambda ref: Path(datasets[ref]),
        reporter=QueueReporter(outbox, cancel, path) if zero else None,
        callbacks=[ProgressToQueue(outbox)] if zero else [],
        resume=resume,
        preempt=preempt.is_set,
    )
    if zero:
        # Delivered before returning: a preempted rank may be killed (with the agent)
        # before its interpreter's teardown would flush the queue.
        outbox.close()
        outbox.join_thread()
    return result
