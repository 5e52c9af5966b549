"""Start the ranks of a data-parallel run on this machine, with torch's elastic agent.

The agent is what `torchrun` runs (`torch.distributed.launcher.api.elastic_launch`):
it spawns one process per rank with torch.distributed's env vars set, rendezvous
over a c10d store on a free local port, and watches them. When one rank dies
(killed, crashed, or failed: a failed rank raises `RankFailed`), the agent ends
the others within its monitor interval, so no rank is left waiting in a
collective; with `max_restarts` 0 the run then fails, and a job restarts from
its last checkpoint as any other (`--resume`, or the service's next attempt).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from worker.engine.files import atomic_write_text
from worker.engine.train import RunResult

# How often the agent looks at its ranks: a dead rank ends the run this fast.
MONITOR_INTERVAL_S = 0.1
# After a rank dies, how long the others get to exit on SIGTERM before SIGKILL.
SHUTDOWN_TIMEOUT_S = 5


class RankFailed(Exception):
    """A rank's run failed (its one-line reason): the rank exits with an error, so the
    agent ends the other ranks at once."""


def run_rank(entry: Callable[..., RunResult], *args: Any) -> dict[str, Any]:
    """What each spawned rank runs: `entry(*args)` (which calls `run_job`), its result
    back to the launcher; a failed run raises, which fails the whole launch."""
    result = entry(*args)
    if result.status == "failed":
        raise RankFailed(result.error or "failed")
    return result.as_dict()


def launch_ranks(
    entry: Callable[..., RunResult], args: tuple[Any, ...], *, nproc: int, run_dir: Path
) -> RunResult:
    """Run `entry(*args)` in `nproc` ranks on this machine; rank 0's result.

    `entry` must be a module-level function (ranks are spawned: it is pickled by
    name). A failed launch writes result.json itself: the ranks were ended
    before rank 0 could."""
    # Every module the agent logs from, imported before `_quiet_agent` looks for loggers.
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend
    import torch.distributed.elastic.rendezvous.dynamic_rendezvous  # noqa: F401
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="torchyard-ranks-") as logs, _quiet_agent():
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=uuid.uuid4().hex,
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",  # as `torchrun --standalone`: a free port
            max_restarts=0,
            monitor_interval=MONITOR_INTERVAL_S,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=logs),  # the ranks' error files
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        try:
            outputs = elastic_launch(config, run_rank)(entry, *args)
        except ChildFailedError as exc:
            result = RunResult(status="failed", error=failure_reason(exc))
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                run_dir / "result.json", json.dumps(result.as_dict(), indent=2) + "\n"
            )
            return result
    names = {f.name for f in fields(RunResult)}
    return RunResult(**{k: v for k, v in outputs[0].items() if k in names})


def failure_reason(exc: Any) -> str:
    """One line for the first rank that failed (by rank); a bug's traceback goes to stderr."""
    rank, failure = min(exc.failures.items())
    data = failure.error_file_data.get("message") if failure.error_file_data else None
    if isinstance(data, dict):
        message = str(data.get("message", ""))
        kind, _, text = message.partition(": ")
        if kind == RankFailed.__name__:
            return text
        callstack = data.get("extraInfo", {}).get("py_callstack")
        if callstack:
            sys.stderr.write(f"rank {rank} failed:\n{callstack}")
        return f"rank {rank} failed: {message}"
    if failure.exitcode < 0:
        return (
            f"rank {rank} (pid {failure.pid}) ended by signal {failure.signal_name()}; "
            f"the other ranks were stopped"
        )
    return f"rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}"


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    """The agent's own log lines (closing signals, a failure dumped in full) say nothing
    `failure_reason` does not; torch's elastic loggers each set their level."""
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith("torch.distributed.elastic")
        or name.startswith("torch.distributed.launcher")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
