"""Metric chunks: a batch of a series' points as one row of packed arrays.

Replaces metric_points (a row per point). The points stored so far are moved
into chunks of up to CHUNK points per series, in step order. The rollups keep
summarising the same points; their finest level (buckets of 16 steps) goes, as
reads that fine now come from the chunks.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHUNK = 10_000
# Spelled out, as app/store/metrics.py packs them when this was written.
DTYPES = {"steps": "<i8", "epochs": "<i4", "values": "<f8", "times": "<f8"}


def upgrade() -> None:
    chunks = op.create_table(
        "metric_chunks",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("first_step", sa.BigInteger(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        *(sa.Column(column, sa.LargeBinary(), nullable=False) for column in DTYPES),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_metric_chunks_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "name", "first_step", name="pk_metric_chunks"),
    )
    points = _points_table()
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(*points.c).order_by(points.c.job_id, points.c.name, points.c.step)
    )
    run: list[Any] = []
    for row in rows:
        if run and (run[0][:2] != row[:2] or len(run) == CHUNK):
            bind.execute(chunks.insert().values(_pack(run)))
            run = []
        run.append(tuple(row))
    if run:
        bind.execute(chunks.insert().values(_pack(run)))
    op.drop_table("metric_points")
    op.execute(sa.text("DELETE FROM metric_rollups WHERE level < 6"))


def downgrade() -> None:
    points = op.create_table(
        "metric_points",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("time", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_metric_points_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "name", "step", name="pk_metric_points"),
    )
    chunks = sa.table("metric_chunks", *(sa.column(c) for c in ("job_id", "name", *DTYPES)))
    bind = op.get_bind()
    for job_id, name, *arrays in bind.execute(sa.select(*chunks.c)).all():
        steps, epochs, values, times = (
            np.frombuffer(a, DTYPES[c]).tolist() for a, c in zip(arrays, DTYPES, strict=True)
        )
        bind.execute(
            points.insert(),
            [
                {
                    "job_id": job_id,
                    "name": name,
                    "step": s,
                    "epoch": e,
                    "value": None if v != v else v,
                    "time": t,
                }
                for s, e, v, t in zip(steps, epochs, values, times, strict=True)
            ],
        )
    op.drop_table("metric_chunks")
    # schema 0002's finest rollups, rebuilt from the points as its own backfill does
    op.execute(sa.text(_revision_0002().backfill_sql(4)))


def _revision_0002() -> Any:
    path = Path(__file__).with_name("0002_metric_rollups.py")
    spec = importlib.util.spec_from_file_location("torchyard_migration_0002", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _points_table() -> sa.TableClause:
    return sa.table(
        "metric_points",
        *(sa.column(c) for c in ("job_id", "name", "step", "epoch", "value", "time")),
    )


def _pack(run: list[tuple[Any, ...]]) -> dict[str, Any]:
    job_id, name = run[0][:2]
    columns = list(zip(*(r[2:] for r in run), strict=True))
    values = [np.nan if v is None else v for v in columns[2]]
    return {
        "job_id": job_id,
        "name": name,
        "first_step": run[0][2],
        "last_step": run[-1][2],
        "count": len(run),
        "steps": np.asarray(columns[0], DTYPES["steps"]).tobytes(),
        "epochs": np.asarray(columns[1], DTYPES["epochs"]).tobytes(),
        "values": np.asarray(values, DTYPES["values"]).tobytes(),
        "times": np.asarray(columns[3], DTYPES["times"]).tobytes(),
    }
