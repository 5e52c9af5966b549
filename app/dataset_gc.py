"""Garbage collection of datasets no job names (`torchyard admin gc-datasets`).

A dataset is collected when no job (of any status) names it and it was uploaded
longer than the grace period ago: an upload that is about to be named by a submit
is never raced. The rows go in one transaction; their folders are removed after it
commits (a crash in between leaves folders no row names, which the start-up sweep
removes).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from app.artifacts import ArtifactStore
from app.db import Sessions, session_scope
from app.models import utcnow
from app.store import datasets


@dataclass(frozen=True)
class Collected:
    id: str
    user_id: int
    name: str
    size: int
    created_at: str


def collect(
    sessions: Sessions, artifacts: ArtifactStore, *, older_than_s: float, dry_run: bool
) -> list[Collected]:
    """The datasets removed (or, with `dry_run`, those that would be)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with session_scope(sessions) as session:
        found = [
            Collected(d.id, d.user_id, d.name, d.size, d.created_at.isoformat(timespec="seconds"))
            for d in datasets.unreferenced(session, cutoff)
        ]
        if dry_run:
            return found
        gone = [d for d in found if datasets.delete_if_unreferenced(session, d.id)]
    for dataset in gone:
        artifacts.delete_tree(f"datasets/{dataset.id}")
    return gone
