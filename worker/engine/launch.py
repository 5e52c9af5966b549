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
import os
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
# How long the nodes of a multi-node launch wait for each other at the start.
RENDEZVOUS_TIMEOUT_S = int(os.environ.get("TORCHYARD_RENDEZVOUS_TIMEOUT_S", "300"))


class RankFailed(Exception):
    """A rank's run failed (its one-line reason): the rank exits with an error, so the
    agent ends the other ranks at once."""


class PeerLost(RankFailed):
    """A rank's run ended because another rank or node was lost (`RunResult.lost`)."""


def run_rank(entry: Callable[..., RunResult], *args: Any) -> dict[str, Any]:
    """What each spawned rank runs: `entry(*args)` (which calls `run_job`), its result
    back to the launcher; a failed run raises, which fails the whole launch."""
    result = entry(*args)
    if result.status == "failed":
        raise (PeerLost if result.lost else RankFailed)(result.error or "failed")
    return result.as_dict()


def launch_ranks(
    entry: Callable[..., RunResult],
    args: tuple[Any, ...],
    *,
    nproc: int,
    run_dir: Path,
    nodes: int = 1,
    node_rank: int = 0,
    endpoint: str | None = None,
    run_id: str | None = None,
) -> RunResult:
    """Run `entry(*args)` in `nproc` ranks on this machine; its lowest rank's result.

    `entry` must be a module-level function (ranks are spawned: it is pickled by
    name). A failed launch writes result.json itself: the ranks were ended
    before rank 0 could.

    Several nodes (`nodes` > 1): each machine calls this with its `node_rank` and
    the same `endpoint` ("host:port" of node 0, which listens there) and `run_id`;
    the agents meet through a c10d TCPStore on that endpoint (torch's static
    rendezvous: node r holds global ranks r * nproc ... r * nproc + nproc - 1),
    and a node missing for `RENDEZVOUS_TIMEOUT_S` fails the launch."""
    # Every module the agent logs from, imported before `_quiet_agent` looks for loggers.
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend
    import torch.distributed.elastic.rendezvous.dynamic_rendezvous  # noqa: F401
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="torchyard-ranks-") as logs, _quiet_agent():
        if nodes > 1:
            if not endpoint:
                raise ValueError("a launch of several nodes needs node 0's endpoint (host:port)")
            rendezvous: dict[str, Any] = {
                "rdzv_backend": "static",
                "rdzv_endpoint": endpoint,
                "rdzv_configs": {"rank": node_rank, "timeout": RENDEZVOUS_TIMEOUT_S},
            }
        else:
            # as `torchrun --standalone`: a free port
            rendezvous = {"rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0"}
        config = LaunchConfig(
            min_nodes=nodes,
            max_nodes=nodes,
            nproc_per_node=nproc,
            run_id=run_id or uuid.uuid4().hex,
            **rendezvous,
            max_restarts=0,
            monitor_interval=MONITOR_INTERVAL_S,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=logs),  # the ranks' error files
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        try:
            outputs = elastic_launch(config, run_rank)(entry, *args)
        except ChildFailedError as exc:
            reason, lost = failure_reason(exc)
            result = RunResult(status="failed", error=reason, lost=lost)
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                run_dir / "result.json", json.dumps(result.as_dict(), indent=2) + "\n"
            )
            return result
    names = {f.name for f in fields(RunResult)}
    # Keyed by global rank: rank 0's on node 0, this node's first rank's elsewhere.
    return RunResult(**{k: v for k, v in outputs[min(outputs)].items() if k in names})


def failure_reason(exc: Any) -> tuple[str, bool]:
    """One line for the failure that explains the others, and whether the run was lost
    (a rank killed, or its peers gone) rather than failed by the job's fault.

    The ranks fail together: when one raises or dies, the others lose their peer. So a
    rank's own failure comes first (its run's one-line reason, then a bug, whose
    traceback goes to stderr), then a rank that died; a rank that only lost its peers
    explains nothing the others do not."""
    failures = sorted(exc.failures.items())
    raised = [(rank, failure, *_raised(failure)) for rank, failure in failures]
    for _, _, kind, text in raised:
        if kind == RankFailed.__name__:
            return text, False
    for rank, failure, kind, text in raised:
        if kind is not None and kind != PeerLost.__name__:
            callstack = failure.error_file_data["message"].get("extraInfo", {}).get("py_callstack")
            if callstack:
                sys.stderr.write(f"rank {rank} failed:\n{callstack}")
            return (
                f"rank {rank} failed: {kind}: {text}" if text else f"rank {rank} failed: {kind}"
            ), False
    for rank, failure, kind, _ in raised:
        if kind is None and failure.exitcode < 0:
            return (
                f"rank {rank} (pid {failure.pid}) ended by signal {failure.signal_name()}; "
                f"the other ranks were stopped"
            ), True
    for _, _, kind, text in raised:
        if kind == PeerLost.__name__:
            return text, True
    rank, failure = failures[0]
    return f"rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}", False


def _raised(failure: Any) -> tuple[str | None, str]:
    """The exception a failed rank raised, from its error file: (type name, message);
    (None, "") when it wrote none (killed, or exited without a Python error)."""
    data = failure.error_file_data.get("message") if failure.error_file_data else None
    if not isinstance(data, dict):
        return None, ""
    kind, _, text = str(data.get("message", "")).partition(": ")
    return kind, text


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
