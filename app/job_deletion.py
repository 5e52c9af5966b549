"""Deleting a finished job: its rows in one transaction, then its files.

Rows go first and files after the commit: a rolled-back delete must still find its
files, and a crash between the two leaves files that no row references: the
artifact store's sweep of orphaned files at start (issue 13's storage work, built
apart from this) removes them.
"""

from __future__ import annotations

from app.artifacts import ArtifactStore, job_folder
from app.db import Sessions, session_scope
from app.store import jobs


def delete_job(sessions: Sessions, artifacts: ArtifactStore, user_id: int, job_id: str) -> None:
    """Remove a succeeded, failed or cancelled job with everything it left behind."""
    with session_scope(sessions) as session:
        jobs.delete_finished(session, user_id, job_id)
    artifacts.delete_tree(job_folder(job_id))
