"""Per-bucket summaries of every metric series, kept up to date on ingest, for downsampling.

At each level in LEVELS a series is cut into aligned buckets of 2**level steps
(bucket b holds steps [b * 2**level, (b + 1) * 2**level)). A bucket's row keeps
four of its points: the first and the last (by step), the lowest and the highest
(by value; a null value, NaN or Inf, counts only when every value is null; a tie
goes to the earlier step). The summary of two disjoint sets of points is the
merge of their summaries, so a batch of new points folds into the stored rows
(the upsert merges in SQL), and each level folds from the one below it.

A downsampled read then costs one row per bucket whatever the series' length:
a 1,000,000-point series comes back in milliseconds, where ranking its raw
points takes seconds. Levels go up by a factor of four (half the rows written
on ingest of a factor two); a read at an odd power of two merges pairs of rows.

Writers hold the job's row lock (as every report does), so two batches of one
job never merge into the same row at once.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from sqlalchemy import Table, and_, literal_column, or_, select, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from app.models import MetricRollup

# Buckets of 64 steps ... 2**32 steps. Finer reads come from the raw points (at most
# 32 steps a bucket: a few thousand points, unpacked from their chunks in a blink).
LEVELS = tuple(range(6, 33, 2))
ROLLUPS = cast(Table, MetricRollup.__table__)
ROLES = ("first", "last", "low", "high")
FIELDS = ("step", "epoch", "value", "time")
COLUMNS = tuple(f"{role}_{field}" for role in ROLES for field in FIELDS)

Point = tuple[int, int, float | None, float]  # step, epoch, value, time


def _low_key(p: Point) -> tuple[bool, float, int]:
    return (p[2] is None, p[2] if p[2] is not None else 0.0, p[0])


def _high_key(p: Point) -> tuple[bool, float, int]:
    return (p[2] is None, -p[2] if p[2] is not None else 0.0, p[0])


@dataclass(frozen=True, slots=True)
class Summary:
    """The first, last, lowest and highest point of a set of points of one series."""

    first: Point
    last: Point
    low: Point
    high: Point

    @classmethod
    def of(cls, points: Sequence[Point]) -> Summary:
        """Of points sorted by step (not empty)."""
        return cls(points[0], points[-1], min(points, key=_low_key), min(points, key=_high_key))

    def merge(self, other: Summary) -> Summary:
        """The summary of the union (the two sets share no step)."""
        return Summary(
            self.first if self.first[0] <= other.first[0] else other.first,
            self.last if self.last[0] >= other.last[0] else other.last,
            self.low if _low_key(self.low) <= _low_key(other.low) else other.low,
            self.high if _high_key(self.high) <= _high_key(other.high) else other.high,
        )

    def points(self) -> list[Point]:
        """Its distinct points by step (one to four)."""
        return sorted({p[0]: p for p in (self.first, self.last, self.low, self.high)}.values())


def bucketed(points: Iterable[Point], width_log2: int) -> Iterator[tuple[int, Summary]]:
    """(bucket, summary) of points sorted by step, for buckets of 2**width_log2 steps."""
    for bucket, group in itertools.groupby(points, key=lambda p: p[0] >> width_log2):
        yield bucket, Summary.of(list(group))


def regrouped(summaries: Iterable[tuple[int, Summary]], shift: int) -> dict[int, Summary]:
    """Summaries of buckets 2**shift times as wide, from (bucket, summary) pairs."""
    out: dict[int, Summary] = {}
    for bucket, summary in summaries:
        key = bucket >> shift
        seen = out.get(key)
        out[key] = summary if seen is None else seen.merge(summary)
    return out


# ------------------------------------------------------------------ ingest


def add(session: Session, job_id: str, points: Iterable[dict[str, Any]]) -> None:
    """Fold newly stored points (each stored once: callers pass only what was new) into
    every level's rows."""
    by_name: dict[str, list[Point]] = {}
    for p in points:
        by_name.setdefault(p["name"], []).append((p["step"], p["epoch"], p["value"], p["time"]))
    for series in by_name.values():
        series.sort()
    add_series(session, job_id, by_name)


def add_series(session: Session, job_id: str, by_name: dict[str, list[Point]]) -> None:
    """`add` for new points already grouped by name, each series sorted by step."""
    if not by_name:
        return
    fresh: dict[tuple[str, int, int], Summary] = {}
    for name, series in by_name.items():
        level_rows = _finest(series)
        for n, level in enumerate(LEVELS):
            if n:
                level_rows = regrouped(level_rows.items(), level - LEVELS[n - 1])
            fresh.update(((name, level, b), s) for b, s in level_rows.items())
    _upsert(session, job_id, fresh)


def _finest(series: list[Point]) -> dict[int, Summary]:
    """`bucketed(series, LEVELS[0])` as a dict, with numpy for a long series (a batch of
    thousands of points: two sorts instead of a Python key call per point and role)."""
    n = len(series)
    if n < 256:
        return dict(bucketed(series, LEVELS[0]))
    steps = np.fromiter((p[0] for p in series), np.int64, n)
    values = np.array([p[2] for p in series], dtype=float)  # None -> NaN
    nulls = np.isnan(values)
    filled = np.where(nulls, 0.0, values)
    buckets = steps >> LEVELS[0]
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    ends = np.r_[starts[1:], n] - 1
    # The series is sorted by step, so each bucket's points are one run, and a sort
    # keyed first by bucket keeps the runs where they are: the first of each run in
    # the sorted order is the run's lowest (highest) by (null last, value, step).
    lows = np.lexsort((steps, filled, nulls, buckets))[starts]
    highs = np.lexsort((steps, -filled, nulls, buckets))[starts]
    return {
        bucket: Summary(series[first], series[last], series[low], series[high])
        for bucket, first, last, low, high in zip(
            buckets[starts].tolist(),
            starts.tolist(),
            ends.tolist(),
            lows.tolist(),
            highs.tolist(),
            strict=True,
        )
    }


def _upsert(session: Session, job_id: str, summaries: dict[tuple[str, int, int], Summary]) -> None:
    rows = [
        {"name": name, "level": level, "bucket": bucket, **_values(summary)}
        for (name, level, bucket), summary in summaries.items()
    ]
    if session.get_bind().dialect.name == "postgresql":
        # one statement, the rows as one JSON document (as for the points)
        session.execute(_PG_UPSERT, {"job_id": job_id, "rows": json.dumps(rows)})
        return
    stmt = sqlite_insert(ROLLUPS)
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "name", "level", "bucket"],
        set_={column: literal_column(sql) for column, sql in _MERGED.items()},
    )
    session.execute(stmt, [{"job_id": job_id, **row} for row in rows])


def _merged() -> dict[str, str]:
    """Per column, the SQL of `Summary.merge` in an upsert: the stored row
    (metric_rollups.*) and the new one (excluded.*) cover disjoint steps; each role
    takes all four columns from the side that wins it. The database folds the
    stored row in itself: no read of it first."""
    stored, new = "metric_rollups", "excluded"

    def key(side: str, role: str, sign: str) -> str:  # _low_key / _high_key in SQL
        value = f"{side}.{role}_value"
        return f"({value} IS NULL, {sign}COALESCE({value}, 0), {side}.{role}_step)"

    wins = {
        "first": f"{new}.first_step < {stored}.first_step",
        "last": f"{new}.last_step > {stored}.last_step",
        "low": f"{key(new, 'low', '')} < {key(stored, 'low', '')}",
        "high": f"{key(new, 'high', '-')} < {key(stored, 'high', '-')}",
    }
    return {
        f"{role}_{field}": (
            f"CASE WHEN {wins[role]} THEN {new}.{role}_{field} ELSE {stored}.{role}_{field} END"
        )
        for role in ROLES
        for field in FIELDS
    }


_MERGED = _merged()


def _pg_upsert() -> Any:
    types = {"step": "bigint", "epoch": "integer", "value": "double precision"}
    columns = ("name", "level", "bucket", *COLUMNS)
    kinds = {"name": "varchar", "level": "smallint", "bucket": "bigint"}
    for column in COLUMNS:
        kinds[column] = types.get(column.split("_")[1], "double precision")
    names = ", ".join(columns)
    record = ", ".join(f"{c} {kinds[c]}" for c in columns)
    updates = ", ".join(f"{c} = {sql}" for c, sql in _merged().items())
    return text(
        f"INSERT INTO metric_rollups (job_id, {names}) "
        f"SELECT :job_id, {names} FROM json_to_recordset(CAST(:rows AS json)) AS r({record}) "
        f"ON CONFLICT (job_id, name, level, bucket) DO UPDATE SET {updates}"
    )


_PG_UPSERT = _pg_upsert()


def _columns() -> list[Any]:
    return [ROLLUPS.c[c] for c in COLUMNS]


def _values(summary: Summary) -> dict[str, Any]:
    return {
        f"{role}_{field}": point[i]
        for role, point in zip(
            ROLES, (summary.first, summary.last, summary.low, summary.high), strict=True
        )
        for i, field in enumerate(FIELDS)
    }


def _summary(row: Sequence[Any]) -> Summary:
    return Summary(
        (row[0], row[1], row[2], row[3]),
        (row[4], row[5], row[6], row[7]),
        (row[8], row[9], row[10], row[11]),
        (row[12], row[13], row[14], row[15]),
    )


# -------------------------------------------------------------------- reads


def level_for(width_log2: int) -> int | None:
    """The coarsest stored level no wider than 2**width_log2 (None: narrower than all)."""
    fitting = [level for level in LEVELS if level <= width_log2]
    return fitting[-1] if fitting else None


def read(
    session: Session, job_id: str, name: str, level: int, first: int, last: int
) -> Iterator[tuple[int, Summary]]:
    """(bucket, summary) of the stored buckets first..last of one level, by bucket."""
    stmt = (
        select(ROLLUPS.c.bucket, *_columns())
        .where(
            ROLLUPS.c.job_id == job_id,
            ROLLUPS.c.name == name,
            ROLLUPS.c.level == level,
            ROLLUPS.c.bucket.between(first, last),
        )
        .order_by(ROLLUPS.c.bucket)
    )
    for row in session.execute(stmt).all():
        yield row[0], _summary(row[1:])


def tiling(start: int, end: int, below: int) -> tuple[list[tuple[int, int]], int, int]:
    """Stored blocks (level, bucket) of levels below `below` that tile [inner_start,
    inner_end), and those two: the steps left at the ends, [start, inner_start) and
    [inner_end, end), are fewer than 2**LEVELS[0] each (read raw). Blocks are taken
    from inner_start up, the widest aligned one that fits first: a few per level."""
    finest = 1 << LEVELS[0]
    inner_start = -(-start // finest) * finest
    inner_end = end // finest * finest
    if inner_start >= inner_end:
        return [], end, end  # fewer than two finest blocks' worth: all raw
    levels = [lv for lv in reversed(LEVELS) if lv < below]
    if not levels:
        return [], end, end
    blocks = []
    pos = inner_start
    while pos < inner_end:
        for level in levels:
            width = 1 << level
            if pos % width == 0 and pos + width <= inner_end:
                blocks.append((level, pos >> level))
                pos += width
                break
    return blocks, inner_start, inner_end


def read_blocks(
    session: Session, job_id: str, name: str, blocks: Sequence[tuple[int, int]]
) -> list[Summary]:
    """The summaries of the given (level, bucket) blocks of one series."""
    if not blocks:
        return []
    stmt = select(*_columns()).where(
        ROLLUPS.c.job_id == job_id,
        ROLLUPS.c.name == name,
        or_(*(and_(ROLLUPS.c.level == lv, ROLLUPS.c.bucket == b) for lv, b in blocks)),
    )
    return [_summary(row) for row in session.execute(stmt)]
