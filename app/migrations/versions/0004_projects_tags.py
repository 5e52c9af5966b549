"""Projects, tags and notes of jobs.

`jobs` gains `project` (every existing job lands in `default`), `tags` (the list as
shown) and `note`; `job_tags` holds each tag of a job with the job's owner, indexed
for `GET /jobs?tag=`. Specs stored before this had no tags, so there is nothing
to copy into `job_tags`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    # Server defaults fill the existing rows (SQLite adds a NOT NULL column only with one).
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("project", sa.String(64), server_default="default", nullable=False)
        )
        batch.add_column(sa.Column("tags", JSON, server_default=sa.text("'[]'"), nullable=False))
        batch.add_column(sa.Column("note", sa.Text(), server_default="", nullable=False))
    op.create_index("ix_jobs_user_id_project_id", "jobs", ["user_id", "project", "id"])
    op.create_index("ix_jobs_user_id_project_status", "jobs", ["user_id", "project", "status"])
    op.create_index("ix_jobs_user_id_best_value_id", "jobs", ["user_id", "best_value", "id"])
    op.create_table(
        "job_tags",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("tag", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_tags_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "tag", name="pk_job_tags"),
    )
    op.create_index("ix_job_tags_user_id_tag_job_id", "job_tags", ["user_id", "tag", "job_id"])


def downgrade() -> None:
    op.drop_index("ix_job_tags_user_id_tag_job_id", table_name="job_tags")
    op.drop_table("job_tags")
    op.drop_index("ix_jobs_user_id_best_value_id", table_name="jobs")
    op.drop_index("ix_jobs_user_id_project_status", table_name="jobs")
    op.drop_index("ix_jobs_user_id_project_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("note")
        batch.drop_column("tags")
        batch.drop_column("project")
