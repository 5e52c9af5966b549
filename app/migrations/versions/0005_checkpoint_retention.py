"""Checkpoint retention: each job's bytes on disk, kept up to date as checkpoints come and go.

`jobs.disk_bytes` is the size of the files the job's checkpoint rows name (each
file once) and of the exports cached beside them (app/retention.py keeps it).
Backfilled from the rows (exports cached before this are counted from the next
export of the job on).

`artifact_store_mark` holds one row: the mark that the artifact root holds too
(app/store_mark.py); the start-up sweep (app/sweep.py) removes files only when
database and root carry the same mark.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "artifact_store_mark",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mark", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_artifact_store_mark"),
    )
    op.add_column(
        "jobs", sa.Column("disk_bytes", sa.BigInteger(), nullable=False, server_default="0")
    )
    # Before this revision no two rows shared a file: the sum of the rows is the sum of files.
    op.execute(
        "UPDATE jobs SET disk_bytes = COALESCE("
        "(SELECT SUM(size) FROM checkpoints WHERE checkpoints.job_id = jobs.id), 0)"
    )


def downgrade() -> None:
    op.drop_table("artifact_store_mark")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("disk_bytes")
