"""Metric points keyed by (job, name, step): idempotent inserts, downsampled history."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from app.models import Job, MetricPoint

POINTS = MetricPoint.__table__


def finite(value: float | None) -> float | None:
    """NaN and Inf are stored and shown as null: JSON, JSONB and SQLite REAL cannot hold NaN."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def finite_json(data: Any) -> Any:
    """A JSON document with every NaN/Inf replaced by null."""
    if isinstance(data, float):
        return finite(data)
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [finite_json(value) for value in data]
    return data


def insert_points(
    session: Session, job: Job, points: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Insert what is missing (a retried batch adds nothing); return the points newly stored.

    Also moves the job's latest value of each metric forward (never back, so a
    late retry of an old batch cannot overwrite a newer value).
    """
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for p in points:
        key = (p["name"], int(p["step"]))
        rows.setdefault(
            key,
            {
                "job_id": job.id,
                "name": p["name"],
                "step": int(p["step"]),
                "epoch": int(p["epoch"]),
                "value": finite(p.get("value")),
                "time": float(p["time"]),
            },
        )
    if not rows:
        return []
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = (
        insert(POINTS)
        .on_conflict_do_nothing(index_elements=["job_id", "name", "step"])
        .returning(POINTS.c.name, POINTS.c.step)
    )
    stored = {(name, step) for name, step in session.execute(stmt, list(rows.values()))}
    inserted = [row for key, row in rows.items() if key in stored]
    _advance_latest(job, inserted)
    return [{k: v for k, v in row.items() if k != "job_id"} for row in inserted]


def _advance_latest(job: Job, rows: list[dict[str, Any]]) -> None:
    latest = dict(job.latest_metrics or {})
    for row in rows:
        seen = latest.get(row["name"])
        if seen is None or row["step"] >= seen["step"]:
            latest[row["name"]] = {
                "step": row["step"],
                "epoch": row["epoch"],
                "value": row["value"],
            }
    # a new dict, so the JSON column is seen as changed
    job.latest_metrics = latest


def latest_values(job: Job) -> dict[str, float | None]:
    return {name: seen["value"] for name, seen in sorted((job.latest_metrics or {}).items())}


def history(
    session: Session,
    job_id: str,
    *,
    names: Collection[str] = (),
    since_step: int | None = None,
    max_points: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Points per name by step; with `max_points`, each series is cut to at most that many.

    Downsampling happens in the database: the series is split into max_points/4
    buckets by step, and each bucket keeps its first, last, lowest and highest
    point, so spikes and the ends of the curve survive.
    """
    stmt = select(
        MetricPoint.name, MetricPoint.step, MetricPoint.epoch, MetricPoint.value, MetricPoint.time
    )
    stmt = stmt.where(MetricPoint.job_id == job_id)
    if names:
        stmt = stmt.where(MetricPoint.name.in_(list(names)))
    if since_step is not None:
        stmt = stmt.where(MetricPoint.step > since_step)
    if max_points is not None:
        stmt = _downsampled(stmt, max_points)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, step, epoch, value, time in session.execute(stmt.order_by("name", "step")):
        out.setdefault(name, []).append(
            {"step": step, "epoch": epoch, "value": value, "time": time}
        )
    return out


def _downsampled(stmt: Select[Any], max_points: int) -> Select[Any]:
    buckets = max(1, max_points // 4)
    base = stmt.add_columns(
        func.count().over(partition_by=MetricPoint.name).label("n"),
        func.ntile(buckets)
        .over(partition_by=MetricPoint.name, order_by=MetricPoint.step)
        .label("bucket"),
    ).subquery()
    group = (base.c.name, base.c.bucket)
    ranked = select(
        base,
        func.row_number().over(partition_by=group, order_by=base.c.step).label("first"),
        func.row_number().over(partition_by=group, order_by=base.c.step.desc()).label("last"),
        func.row_number()
        .over(partition_by=group, order_by=(base.c.value.asc().nulls_last(), base.c.step))
        .label("low"),
        func.row_number()
        .over(partition_by=group, order_by=(base.c.value.desc().nulls_last(), base.c.step))
        .label("high"),
    ).subquery()
    return select(
        ranked.c.name, ranked.c.step, ranked.c.epoch, ranked.c.value, ranked.c.time
    ).where(
        or_(
            ranked.c.n <= max_points,
            ranked.c.first == 1,
            ranked.c.last == 1,
            ranked.c.low == 1,
            ranked.c.high == 1,
        )
    )
