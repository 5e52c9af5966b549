"""Metric points keyed by (job, name, step): idempotent inserts, downsampled history."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from app.models import Job, MetricPoint
from app.store import metric_rollups
from app.store.metric_rollups import Point

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
    late retry of an old batch cannot overwrite a newer value), and folds the new
    points into the series' rollups. The caller holds the job's row lock.
    """
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for p in points:
        key = (p["name"], int(p["step"]))
        rows.setdefault(
            key,
            {
                "name": p["name"],
                "step": int(p["step"]),
                "epoch": int(p["epoch"]),
                "value": finite(p.get("value")),
                "time": float(p["time"]),
            },
        )
    if not rows:
        return []
    if session.get_bind().dialect.name == "postgresql":
        stored = _insert_pg(session, job.id, list(rows.values()))
    else:
        stmt = (
            sqlite_insert(POINTS)
            .on_conflict_do_nothing(index_elements=["job_id", "name", "step"])
            .returning(POINTS.c.name, POINTS.c.step)
        )
        values = [{"job_id": job.id, **row} for row in rows.values()]
        stored = {(name, step) for name, step in session.execute(stmt, values).all()}
    inserted = [row for key, row in rows.items() if key in stored]
    _advance_latest(job, inserted)
    metric_rollups.add(session, job.id, inserted)
    return inserted


# One statement, the rows passed as one JSON document: a multi-row VALUES of
# thousands of rows costs more Python to build, and the driver more to parse,
# than Postgres spends storing them (arrays cost the driver about as much).
_PG_INSERT = text(
    "INSERT INTO metric_points (job_id, name, step, epoch, value, time) "
    "SELECT :job_id, p.name, p.step, p.epoch, p.value, p.time "
    "FROM json_to_recordset(CAST(:rows AS json)) "
    "AS p(name varchar, step bigint, epoch integer, value double precision, time double precision) "
    "ON CONFLICT (job_id, name, step) DO NOTHING "
    "RETURNING name, step"
)


def _insert_pg(session: Session, job_id: str, rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
    params = {"job_id": job_id, "rows": json.dumps(rows)}
    return {(name, step) for name, step in session.execute(_PG_INSERT, params).all()}


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

    A series longer than `max_points` is split into aligned buckets of 2**k steps
    (the smallest k that gives at most max_points/4 buckets over its steps), and
    each bucket keeps its first, last, lowest and highest point, so spikes and the
    ends of the curve survive. The buckets come from the rollups kept on ingest
    (app/store/metric_rollups.py): a read costs one row per bucket, whatever the
    series' length. Aligned buckets also stay put as a live series grows.
    """
    if max_points is None:
        return _raw(session, job_id, names, since_step)
    wanted = list(names) or _names(session, job_id)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in wanted:
        points = _downsampled(session, job_id, name, since_step, max_points)
        if points:
            out[name] = [_point(p) for p in points]
    return out


def _raw(
    session: Session, job_id: str, names: Collection[str], since_step: int | None
) -> dict[str, list[dict[str, Any]]]:
    stmt = select(POINTS.c.name, *_POINT).where(POINTS.c.job_id == job_id)
    if names:
        stmt = stmt.where(POINTS.c.name.in_(list(names)))
    if since_step is not None:
        stmt = stmt.where(POINTS.c.step > since_step)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, *point in session.execute(stmt.order_by(POINTS.c.name, POINTS.c.step)):
        out.setdefault(name, []).append(_point(point))
    return out


_POINT = (POINTS.c.step, POINTS.c.epoch, POINTS.c.value, POINTS.c.time)


def _point(p: Sequence[Any]) -> dict[str, Any]:
    return {"step": p[0], "epoch": p[1], "value": p[2], "time": p[3]}


def _names(session: Session, job_id: str) -> list[str]:
    # the coarsest rollups hold one row per name: no scan of the points
    top = metric_rollups.ROLLUPS.c
    stmt = select(top.name).where(top.job_id == job_id, top.level == metric_rollups.LEVELS[-1])
    return sorted(set(session.execute(stmt).scalars()))


def _downsampled(
    session: Session, job_id: str, name: str, since_step: int | None, max_points: int
) -> list[Point]:
    where = [POINTS.c.job_id == job_id, POINTS.c.name == name]
    if since_step is not None:
        where.append(POINTS.c.step > since_step)
    head = session.execute(
        select(*_POINT).where(*where).order_by(POINTS.c.step).limit(max_points + 1)
    ).all()
    if len(head) <= max_points:
        return [tuple(p) for p in head]  # short enough already: every point
    lo = head[0][0]
    hi = session.execute(select(func.max(POINTS.c.step)).where(*where)).scalar_one()
    budget = max(1, max_points // 4)
    k = 0
    while (hi >> k) - (lo >> k) + 1 > budget:
        k += 1
    level = metric_rollups.level_for(k)
    if level is None:  # buckets narrower than any rollup: at most 2**k * budget raw points
        raw = session.execute(
            select(*_POINT).where(*where, POINTS.c.step <= hi).order_by(POINTS.c.step)
        )
        buckets = metric_rollups.regrouped(metric_rollups.bucketed(map(tuple, raw), 0), k)
    else:
        first_block = lo >> level
        blocks = list(metric_rollups.read(session, job_id, name, level, first_block, hi >> level))
        starts_before = since_step is not None and (first_block << level) <= since_step
        if starts_before and blocks and blocks[0][0] == first_block:
            # the first stored block may hold points at or before since_step: rebuild
            # it from finer blocks and raw points of (since_step, its end)
            blocks[0] = (first_block, _range_summary(session, job_id, name, lo, first_block, level))
        buckets = metric_rollups.regrouped(blocks, k - level)
    return [p for _, summary in sorted(buckets.items()) for p in summary.points()]


def _range_summary(
    session: Session, job_id: str, name: str, lo: int, block: int, level: int
) -> metric_rollups.Summary:
    """The summary of steps [lo, end of `block` at `level`), from stored blocks and raw points."""
    end = (block + 1) << level
    pieces, pos = metric_rollups.cover(lo, end, level)
    parts = metric_rollups.read_blocks(session, job_id, name, pieces)
    if pos > lo:
        raw = list(
            session.execute(
                select(*_POINT)
                .where(
                    POINTS.c.job_id == job_id,
                    POINTS.c.name == name,
                    POINTS.c.step >= lo,
                    POINTS.c.step < pos,
                )
                .order_by(POINTS.c.step)
            )
        )
        if raw:
            parts.append(metric_rollups.Summary.of([tuple(p) for p in raw]))
    summary = parts[0]
    for part in parts[1:]:
        summary = summary.merge(part)
    return summary
