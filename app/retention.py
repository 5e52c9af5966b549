"""Which checkpoints a job keeps: the spec's `save_top_k` best ones and the newest `last`.

A new checkpoint is recorded first; the rows it supersedes are deleted in the same
transaction, and their files are unlinked only after that commits
(`unlink_unreferenced`). A crash before the commit leaves the old rows and files
as they were (plus the new file, which no row names); a crash after it leaves
files no row names. Either way the start-up sweep (app/sweep.py) removes what no
row names, and no file is removed while a row still names it, so the only copy of
a checkpoint is never lost.

`best` and `top_k` rows of one epoch name one file: the engine writes them as the
same bytes and the service stores a job's file of one sha256 once
(app.protocol). A job's `disk_bytes` counts each file once, with the exports
cached beside it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.orm import Session

from app.artifacts import ArtifactStore
from app.db import Sessions, session_scope
from app.errors import NotFound
from app.models import Checkpoint, Job
from app.store import checkpoints, jobs

log = logging.getLogger(__name__)

RANKED = ("best", "top_k")  # weights ranked by the monitored value; `last` is training state
Mode = Literal["min", "max"]


@dataclass(frozen=True)
class Policy:
    """What a job's spec asks to keep: `top_k` ranked epochs (0: none) and the newest last."""

    top_k: int
    mode: Mode | None  # None: the default of the monitored metric's name

    def mode_for(self, monitor: str | None) -> Mode:
        from worker.engine.spec import default_mode

        return self.mode or default_mode(monitor or "")


def policy_of(spec: dict[str, Any]) -> Policy:
    """The policy of a stored spec (already validated at submission)."""
    from worker.engine.spec import CheckpointSpec

    callbacks = spec.get("callbacks") or {}
    if "checkpoint" in callbacks and callbacks["checkpoint"] is None:
        return Policy(top_k=0, mode=None)  # no checkpoint callback: nothing ranked is saved
    config = CheckpointSpec.model_validate(callbacks.get("checkpoint") or {})
    return Policy(top_k=config.save_top_k, mode=config.mode)


def ranked(rows: Iterable[Checkpoint], policy: Policy) -> list[Checkpoint]:
    """The `best` and `top_k` rows, best first; ties keep the earlier epoch (as the engine's
    `top_k_decision`). Rows without a finite value rank last, the newest first: the
    engine saves `best` only when it improves, so the newest of them is the best."""

    def key(row: Checkpoint) -> tuple[bool, float, int, bool]:
        value = row.value
        if value is None or math.isnan(value):
            return (True, 0.0, -row.epoch, row.kind != "best")
        sign = 1.0 if policy.mode_for(row.monitor) == "min" else -1.0
        return (False, sign * float(value), row.epoch, row.kind != "best")

    return sorted((r for r in rows if r.kind in RANKED), key=key)


def superseded(rows: Iterable[Checkpoint], policy: Policy) -> list[Checkpoint]:
    """The rows the policy no longer keeps: every `last` but the newest, and the ranked
    rows of epochs outside the `top_k` best (both rows of a kept epoch stay)."""
    rows = list(rows)
    lasts = [r for r in rows if r.kind == "last"]
    newest = max(lasts, key=lambda r: (r.epoch, r.step), default=None)
    kept_epochs: list[int] = []
    for row in ranked(rows, policy):
        if len(kept_epochs) == policy.top_k:
            break
        if row.epoch not in kept_epochs:
            kept_epochs.append(row.epoch)
    return [
        r
        for r in rows
        if (r.kind == "last" and r is not newest)
        or (r.kind in RANKED and r.epoch not in kept_epochs)
    ]


def enforce(session: Session, artifacts: ArtifactStore, job: Job) -> list[str]:
    """Delete the rows the policy no longer keeps and refresh `job.disk_bytes`, in the
    caller's transaction (the job locked). Returns the paths those rows named: pass them
    to `unlink_unreferenced` after the commit."""
    rows = checkpoints.list_for_job(session, job.id)
    dropped = superseded(rows, policy_of(job.spec))
    checkpoints.delete_rows(session, dropped)
    job.disk_bytes = disk_bytes(artifacts, [r for r in rows if r not in dropped])
    return [r.path for r in dropped]


def disk_bytes(artifacts: ArtifactStore, rows: Iterable[Checkpoint]) -> int:
    """Each file the rows name, once, with its cached exports."""
    return sum(artifacts.bytes_with_exports(path) for path in {r.path for r in rows})


def unlink_unreferenced(
    sessions: Sessions, artifacts: ArtifactStore, job_id: str, paths: Collection[str]
) -> None:
    """Unlink those of `paths` no row of the job names, after the rows were committed gone.

    Under the job's row lock: an upload of the job places its file under that lock too,
    so a file placed again under a name just dropped is never unlinked under its new row.
    A failure here only leaves files for the start-up sweep.
    """
    if not paths:
        return
    try:
        with session_scope(sessions) as session:
            # a job that is gone took every row that could name these with it
            with contextlib.suppress(NotFound):
                jobs.lock(session, job_id)
            named = checkpoints.referenced(session, job_id, paths)
            for path in sorted(set(paths) - named):
                artifacts.delete(path)
    except Exception:
        log.warning(
            "job %s: superseded checkpoint files left for the start-up sweep: %s",
            job_id,
            sorted(paths),
            exc_info=True,
        )


def best(session: Session, job: Job) -> Checkpoint:
    """The best of the kept `best` and `top_k` checkpoints by the monitored value."""
    rows = ranked(checkpoints.list_for_job(session, job.id), policy_of(job.spec))
    if not rows:
        raise NotFound(f"job {job.id!r} has no best checkpoint yet")
    return rows[0]


def refresh_disk_bytes(sessions: Sessions, artifacts: ArtifactStore, job_id: str) -> None:
    """Recount a job's bytes (after an export was cached beside one of its files)."""
    with session_scope(sessions) as session:
        job = jobs.lock(session, job_id)
        job.disk_bytes = disk_bytes(artifacts, checkpoints.list_for_job(session, job_id))
