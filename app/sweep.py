"""The start-up sweep: what a crash at any moment can leave behind, removed at the next start.

- Checkpoint rows the job's policy no longer keeps (a crash between the commit of a
  new checkpoint and the pruning cannot happen: they share a transaction; this
  shrinks jobs stored before retention existed).
- Files under `jobs/<id>/checkpoints/` no row names (a crash after the rows were
  committed gone but before their files were unlinked, or after a file was moved in
  but before its row committed), with the exports cached beside them, and temp
  files of exports that died.
- Dataset folders no row names (a crash between a dataset's deletion and its file's).
- Upload temp files in `tmp/` (`ArtifactStore.sweep_temp`).
- Rows whose file is gone (damage from outside: the service never removes a file a
  row names) are logged as a warning, and kept.

Only files older than `grace_s` are removed: another API process may be moving a
file in right now, and its row commits moments later. Nothing but upload temp
files is removed unless the database and the artifact root carry the same mark
(`unpaired`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from app import retention
from app.artifacts import STALE_TEMP_S, ArtifactStore, owner_stem
from app.db import Sessions, session_scope
from app.errors import NotFound
from app.store import checkpoints, datasets, jobs, marks

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    files: list[str] = field(default_factory=list)  # removed, relative to the artifact root
    freed_bytes: int = 0
    pruned_rows: int = 0  # superseded by their job's policy
    missing_files: list[str] = field(default_factory=list)  # "<job>/<path>" rows name, gone
    temp_files: int = 0
    refused: str | None = None  # why nothing but temp files was swept (`unpaired`)

    def summary(self) -> str:
        return (
            f"sweep: removed {len(self.files)} unreferenced file(s) ({self.freed_bytes:,} bytes), "
            f"{self.pruned_rows} superseded checkpoint row(s), {self.temp_files} stale upload "
            f"temp file(s); {len(self.missing_files)} row(s) name a file that is gone"
        )


def sweep(
    sessions: Sessions,
    artifacts: ArtifactStore,
    *,
    grace_s: float,
    temp_grace_s: float = STALE_TEMP_S,
) -> SweepReport:
    report = SweepReport(temp_files=artifacts.sweep_temp(temp_grace_s))
    report.refused = unpaired(sessions, artifacts)
    if report.refused:
        log.warning("sweep skipped: %s", report.refused)
        return report
    cutoff = time.time() - grace_s
    _prune_superseded(sessions, artifacts, report)
    with session_scope(sessions) as session:
        rows = list(checkpoints.all_files(session))
        dataset_ids = datasets.all_ids(session)
    stems: dict[str, set[str]] = defaultdict(set)
    for _, job_id, path in rows:
        stems[job_id].add(owner_stem(Path(path).name))
    _sweep_checkpoint_files(artifacts, stems, cutoff, report)
    _sweep_dataset_folders(artifacts, dataset_ids, cutoff, report)
    _report_rows_without_files(artifacts, rows, report)
    if report.files or report.pruned_rows or report.temp_files:
        log.info(report.summary())
    return report


def unpaired(sessions: Sessions, artifacts: ArtifactStore) -> str | None:
    """None when this database and artifact root go together; else why not.

    The database and the root hold the same random mark (`artifact_store_mark`, a row
    and a file). A service pointed at another database (a new, empty one) would find
    none of the root's files named and remove them all: with marks that differ, or a
    marked root and an unmarked database, nothing is removed. A new pair is marked at
    its first start; a root without a mark takes the database's (a new volume, or a
    start that stopped between the two writes).
    """
    root_mark = artifacts.read_mark()
    with session_scope(sessions) as session:
        db_mark = marks.get(session)
    if db_mark is None and root_mark is not None:
        return (
            f"the artifact root {artifacts.root} is marked {root_mark!r} and this database "
            f"holds no mark: it is not the database of these files (if it is, remove "
            f"{artifacts.mark_path} to pair them)"
        )
    if db_mark is None:
        db_mark, _ = marks.get_or_create(sessions)
    root_mark = artifacts.claim_mark(db_mark)
    if root_mark != db_mark:
        return (
            f"the artifact root {artifacts.root} is marked {root_mark!r} and this database "
            f"{db_mark!r}: they do not belong together (if they do, remove "
            f"{artifacts.mark_path} to pair them)"
        )
    return None


def _prune_superseded(sessions: Sessions, artifacts: ArtifactStore, report: SweepReport) -> None:
    with session_scope(sessions) as session:
        candidates = checkpoints.jobs_with_several(session)
    for job_id in candidates:
        with session_scope(sessions) as session:
            try:
                job = jobs.lock(session, job_id)
            except NotFound:
                continue
            dropped = retention.enforce(session, artifacts, job)
        report.pruned_rows += len(dropped)
        retention.unlink_unreferenced(sessions, artifacts, job_id, dropped)


def _sweep_checkpoint_files(
    artifacts: ArtifactStore, stems: dict[str, set[str]], cutoff: float, report: SweepReport
) -> None:
    for job_dir in _subfolders(artifacts.root / "jobs"):
        folder = job_dir / "checkpoints"
        named = stems.get(job_dir.name, set())
        for entry in _entries(folder):
            is_temp = entry.name.startswith(".")  # an export's temp (worker.engine.files)
            if not entry.is_file(follow_symlinks=False):
                continue
            if not is_temp and owner_stem(entry.name) in named:
                continue
            _remove_if_old(artifacts, Path(entry.path), cutoff, report)
        if not named:  # a job without checkpoints (or deleted): its empty folders go too
            for empty in (folder, job_dir):
                _rmdir_if_old(empty, cutoff)


def _sweep_dataset_folders(
    artifacts: ArtifactStore, dataset_ids: set[str], cutoff: float, report: SweepReport
) -> None:
    for folder in _subfolders(artifacts.root / "datasets"):
        if folder.name in dataset_ids:
            continue
        files = [Path(e.path) for e in _entries(folder) if e.is_file(follow_symlinks=False)]
        # an upload moves its file in and describes it before its row commits
        if any(_mtime(f) >= cutoff for f in files) or _mtime(folder) >= cutoff:
            continue
        size = sum(_size(f) for f in files)
        shutil.rmtree(folder, ignore_errors=True)
        report.files.extend(str(f.relative_to(artifacts.root)) for f in files)
        report.freed_bytes += size


def _report_rows_without_files(
    artifacts: ArtifactStore, rows: list[tuple[int, str, str]], report: SweepReport
) -> None:
    # Reported, not deleted: the service never removes a file a row names, so a missing
    # one was lost outside it (a volume not mounted?), and the row is the only trace.
    for _, job_id, path in rows:
        if not artifacts.exists(path):
            report.missing_files.append(f"{job_id}/{path}")
    if report.missing_files:
        log.warning(
            "sweep: %d checkpoint row(s) name a file that is gone, first: %s",
            len(report.missing_files),
            report.missing_files[:5],
        )


def _remove_if_old(
    artifacts: ArtifactStore, path: Path, cutoff: float, report: SweepReport
) -> None:
    try:
        stat = path.stat()
        if stat.st_mtime >= cutoff:
            return
        path.unlink()
    except FileNotFoundError:
        return
    report.files.append(str(path.relative_to(artifacts.root)))
    report.freed_bytes += stat.st_size


def _rmdir_if_old(folder: Path, cutoff: float) -> None:
    # a young folder may be one an upload just made for its first file
    with contextlib.suppress(OSError):
        if _mtime(folder) < cutoff:
            folder.rmdir()  # only when empty


def _subfolders(folder: Path) -> list[Path]:
    return [Path(e.path) for e in _entries(folder) if e.is_dir(follow_symlinks=False)]


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
