"""Metric rollups: per-bucket first, last, lowest and highest point of each series.

Backfills the rollups of the points already stored, so downsampled reads of old
jobs stay complete.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out, as app/store/metric_rollups.py had them when this was written.
LEVELS = tuple(range(4, 33, 2))
ROLES = ("first", "last", "low", "high")
FIELDS = ("step", "epoch", "value", "time")
TYPES = {"step": sa.BigInteger, "epoch": sa.Integer, "value": sa.Double, "time": sa.Double}


def upgrade() -> None:
    op.create_table(
        "metric_rollups",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        *(
            sa.Column(f"{role}_{field}", TYPES[field](), nullable=field == "value")
            for role in ROLES
            for field in FIELDS
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_metric_rollups_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "name", "level", "bucket", name="pk_metric_rollups"),
    )
    for level in LEVELS:
        op.execute(sa.text(backfill_sql(level)))


def backfill_sql(level: int) -> str:
    """One level's rows from metric_points: rank each bucket's points four ways, keep the tops.

    Lowest: smallest value, nulls last, then the earliest step; highest likewise.
    """
    width = 1 << level
    part = f"PARTITION BY job_id, name, step / {width}"
    picks = ", ".join(
        f"MAX(CASE WHEN r_{role} = 1 THEN {field} END)" for role in ROLES for field in FIELDS
    )
    columns = ", ".join(f"{role}_{field}" for role in ROLES for field in FIELDS)
    return f"""
        INSERT INTO metric_rollups (job_id, name, level, bucket, {columns})
        SELECT job_id, name, {level}, bucket, {picks}
        FROM (
            SELECT job_id, name, step, epoch, value, time, step / {width} AS bucket,
                ROW_NUMBER() OVER ({part} ORDER BY step) AS r_first,
                ROW_NUMBER() OVER ({part} ORDER BY step DESC) AS r_last,
                ROW_NUMBER() OVER ({part} ORDER BY (value IS NULL), value, step) AS r_low,
                ROW_NUMBER() OVER ({part} ORDER BY (value IS NULL), value DESC, step) AS r_high
            FROM metric_points
        ) AS ranked
        WHERE r_first = 1 OR r_last = 1 OR r_low = 1 OR r_high = 1
        GROUP BY job_id, name, bucket
    """


def downgrade() -> None:
    op.drop_table("metric_rollups")
