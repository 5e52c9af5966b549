"""Metric series stored in chunks (a batch of a series per row): idempotent inserts,
raw and downsampled history."""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from sqlalchemy import Table, func, select, text, tuple_
from sqlalchemy.orm import Session

from app.models import Job, MetricChunk
from app.store import metric_rollups
from app.store.metric_rollups import Point

CHUNKS = cast(Table, MetricChunk.__table__)


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


@dataclass
class Stored:
    """What `insert_points` stored: per name its new points (step, epoch, value, time),
    by step, and the chunk they went to."""

    series: dict[str, list[Point]] = field(default_factory=dict)
    chunks: dict[str, int] = field(default_factory=dict)  # name -> first_step of its chunk

    @property
    def count(self) -> int:
        return sum(len(points) for points in self.series.values())

    def chunk_keys(self) -> list[list[Any]]:
        """[name, chunk's first_step, first and last new step] per series: what a metrics
        event stores in place of a copy of the points (`chunk_points` reads them back)."""
        return [
            [name, self.chunks[name], points[0][0], points[-1][0]]
            for name, points in self.series.items()
        ]

    def newest(self) -> Point:
        """The point with the highest step (the series are not empty)."""
        return max((points[-1] for points in self.series.values()), key=lambda p: p[0])


def insert_points(session: Session, job: Job, points: Iterable[dict[str, Any]]) -> Stored:
    """Store what is new (a retried batch adds nothing); return what was newly stored.

    Each series' steps not stored yet go into one chunk (a row of packed arrays):
    the series' last chunk while it is small, else a new one. A worker reports a
    series in step order, so the usual
    batch starts past the last step stored for its name (the job's latest_metrics
    keeps it) and nothing need be read; a retried, overlapping or late batch (a
    resumed attempt repeats the steps since its checkpoint) has the steps stored
    already in its range read and left out. Also moves the job's latest values
    forward and folds the new points into the series' rollups. The caller holds
    the job's row lock.
    """
    by_name: dict[str, dict[int, Point]] = {}
    for p in points:
        series = by_name.get(p["name"])
        if series is None:
            series = by_name[p["name"]] = {}
        step = int(p["step"])
        if step not in series:  # the first of repeats within a batch wins
            value = p.get("value")
            if value is not None and not math.isfinite(value):
                value = None
            series[step] = (step, int(p["epoch"]), value, float(p["time"]))
    latest = job.latest_metrics or {}
    stored = Stored()
    for name, series in by_name.items():
        steps = sorted(series)  # already in order, as a rule: a linear pass
        seen = latest.get(name)
        if seen is not None and steps[0] <= seen["step"]:
            there = _stored_steps(session, job.id, name, steps[0], steps[-1])
            steps = [step for step in steps if step not in there]
        if steps:
            stored.series[name] = [series[step] for step in steps]
    if not stored.series:
        return stored
    tails = _write_chunks(session, job.id, latest, stored)
    _advance_latest(job, stored, tails)
    metric_rollups.add_series(session, job.id, stored.series)
    return stored


# A series' last chunk takes the points of following batches until it holds this
# many: a worker reports every second or so, and a chunk per report would leave a
# days-long run with hundreds of thousands of tiny rows to read.
CHUNK_POINTS = 4096
# Only a small batch is appended to the last chunk: an append rewrites the chunk's
# arrays whole (Postgres copies a changed value out of line, TOAST), so appending a
# 1,000-point batch to a chunk of 3,000 writes 4,000 points' bytes, not 1,000. A batch
# this big is a row of its own: a 1,000,000-point series so reported is 1,000 rows.
APPEND_BELOW = 256


def _write_chunks(
    session: Session, job_id: str, latest: dict[str, Any], stored: Stored
) -> dict[str, list[int]]:
    """Append each series' new points to its last chunk while that is small and they all
    come after it; else store them as a chunk of their own. Returns the series' new
    last chunks, [first_step, count, last_step], for latest_metrics to keep."""
    appends: list[dict[str, Any]] = []
    inserts: list[dict[str, Any]] = []
    tails: dict[str, list[int]] = {}
    for name, points in stored.series.items():
        seen = latest.get(name) or {}
        tail = seen.get("chunk")  # [first_step, count, last_step] of the series' last chunk
        packed = _pack(job_id, name, points)
        if (
            tail
            and len(points) < APPEND_BELOW
            and points[0][0] > tail[2]
            and tail[1] + len(points) <= CHUNK_POINTS
        ):
            stored.chunks[name] = tail[0]
            appends.append({**packed, "first_step": tail[0]})
            tails[name] = [tail[0], tail[1] + len(points), points[-1][0]]
        else:
            stored.chunks[name] = points[0][0]
            inserts.append(packed)
            if "step" not in seen or points[-1][0] > seen["step"]:  # not a late batch's
                tails[name] = [points[0][0], len(points), points[-1][0]]
    if inserts:
        session.execute(CHUNKS.insert(), inserts)
    if appends:
        blob = "bytea" if session.get_bind().dialect.name == "postgresql" else "BLOB"
        arrays = ", ".join(f'"{c}" = CAST("{c}" || :{c} AS {blob})' for c in DTYPES)
        session.execute(
            text(
                f"UPDATE metric_chunks SET last_step = :last_step, count = count + :count, "
                f"{arrays} WHERE job_id = :job_id AND name = :name AND first_step = :first_step"
            ),
            appends,
        )
    return tails


def chunk_points(
    session: Session, job_id: str, keys: Iterable[Sequence[Any]]
) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """The points named by `Stored.chunk_keys` keys, [name, chunk's first_step, first step,
    last step], as reported: one query for all of them. (A key of two, [name, first_step],
    from before chunks took appends, names the whole chunk.)"""
    wanted = {tuple(key) for key in keys}
    if not wanted:
        return {}
    chunk_ids = {(str(key[0]), int(key[1])) for key in wanted}
    stmt = select(
        CHUNKS.c.name,
        CHUNKS.c.first_step,
        CHUNKS.c.steps,
        CHUNKS.c.epochs,
        CHUNKS.c["values"],
        CHUNKS.c.times,
    ).where(CHUNKS.c.job_id == job_id, tuple_(CHUNKS.c.name, CHUNKS.c.first_step).in_(chunk_ids))
    chunks = {(name, first): _unpack(arrays) for name, first, *arrays in session.execute(stmt)}
    found: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for key in wanted:
        name, first = key[0], key[1]
        lo, hi = (key[2], key[3]) if len(key) == 4 else (None, None)
        found[key] = [
            {"name": name, "step": p[0], "epoch": p[1], "value": p[2], "time": p[3]}
            for p in chunks.get((name, first), [])
            if lo is None or hi is None or lo <= p[0] <= hi
        ]
    return found


def _unpack(arrays: Sequence[bytes]) -> list[Point]:
    steps, epochs, values, times = (
        np.frombuffer(blob, dtype) for blob, dtype in zip(arrays, DTYPES.values(), strict=True)
    )
    return as_points(steps, epochs, values, times)


def as_points(steps: Any, epochs: Any, values: Any, times: Any) -> list[Point]:
    """Points from the arrays (NaN back to null)."""
    nulls = np.isnan(values)
    value_list: list[float | None] = values.tolist()
    if nulls.any():
        for i in np.flatnonzero(nulls).tolist():
            value_list[i] = None
    return list(zip(steps.tolist(), epochs.tolist(), value_list, times.tolist(), strict=True))


def _stored_steps(session: Session, job_id: str, name: str, lo: int, hi: int) -> set[int]:
    """The steps in [lo, hi] already stored for the series."""
    stmt = select(CHUNKS.c.steps).where(
        CHUNKS.c.job_id == job_id,
        CHUNKS.c.name == name,
        CHUNKS.c.first_step <= hi,
        CHUNKS.c.last_step >= lo,
    )
    found: set[int] = set()
    for (blob,) in session.execute(stmt):
        steps = np.frombuffer(blob, DTYPES["steps"])
        found.update(steps[(steps >= lo) & (steps <= hi)].tolist())
    return found


# How a chunk's arrays are packed (little-endian; NaN stands for a null value).
DTYPES = {"steps": "<i8", "epochs": "<i4", "values": "<f8", "times": "<f8"}


def _pack(job_id: str, name: str, points: list[Point]) -> dict[str, Any]:
    steps, epochs, values, times = zip(*points, strict=True)
    return {
        "job_id": job_id,
        "name": name,
        "first_step": steps[0],
        "last_step": steps[-1],
        "count": len(points),
        "steps": np.array(steps, DTYPES["steps"]).tobytes(),
        "epochs": np.array(epochs, DTYPES["epochs"]).tobytes(),
        # None (NaN or Inf reported) is packed as NaN
        "values": np.array(values, dtype=float).astype(DTYPES["values"]).tobytes(),
        "times": np.array(times, DTYPES["times"]).tobytes(),
    }


def _advance_latest(job: Job, stored: Stored, tails: dict[str, list[int]]) -> None:
    latest = dict(job.latest_metrics or {})
    for name, points in stored.series.items():
        step, epoch, value, _ = points[-1]  # points are by step
        seen = latest.get(name)
        if seen is None or step >= seen["step"]:
            latest[name] = {"step": step, "epoch": epoch, "value": value}
        else:
            latest[name] = dict(seen)
        if name in tails:
            latest[name]["chunk"] = tails[name]
        elif seen is not None and "chunk" in seen:
            latest[name]["chunk"] = seen["chunk"]
    # a new dict, so the JSON column is seen as changed
    job.latest_metrics = latest


def latest_values(job: Any) -> dict[str, float | None]:
    return {name: seen["value"] for name, seen in sorted((job.latest_metrics or {}).items())}


def history(
    session: Session,
    job_id: str,
    *,
    names: Collection[str] = (),
    since_step: int | None = None,
    until_step: int | None = None,
    max_points: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Points per name by step, since_step < step <= until_step; with `max_points`, each
    series (within that range) is cut to at most that many.

    A series longer than `max_points` is split into aligned buckets of 2**k steps
    (the smallest k that gives at most max_points/4 buckets over its steps), and
    each bucket keeps its first, last, lowest and highest point, so spikes and the
    ends of the curve survive. The buckets come from the rollups kept on ingest
    (app/store/metric_rollups.py): a read costs one row per bucket, whatever the
    series' length. Aligned buckets also stay put as a live series grows.
    """
    # The chunks' sizes first (a few rows: a chunk holds up to CHUNK_POINTS points):
    # every series short enough is then read whole, all of them in one query; only
    # longer ones take the rollups.
    ranges = select(
        CHUNKS.c.name, CHUNKS.c["count"], CHUNKS.c.first_step, CHUNKS.c.last_step
    ).where(CHUNKS.c.job_id == job_id)
    if names:
        ranges = ranges.where(CHUNKS.c.name.in_(list(names)))
    if since_step is not None:
        ranges = ranges.where(CHUNKS.c.last_step > since_step)
    if until_step is not None:
        ranges = ranges.where(CHUNKS.c.first_step <= until_step)
    spans: dict[str, tuple[int, int, int]] = {}  # name -> (points, first step, last step)
    for name, count, first, last in session.execute(ranges):
        seen = spans.get(name)
        spans[name] = (
            (count, first, last)
            if seen is None
            else (seen[0] + count, min(seen[1], first), max(seen[2], last))
        )
    whole = [n for n, span in spans.items() if max_points is None or span[0] <= max_points]
    before = None if until_step is None else until_step + 1
    out = {
        name: [_point(p) for p in pts]
        for name, pts in _series(session, job_id, whole, since_step, before)
    }
    for name, span in spans.items():
        if name not in whole and max_points is not None:
            # without a step range the span is exact: no need to read the head for it
            known = span if since_step is None and until_step is None else None
            points = _downsampled(session, job_id, name, since_step, until_step, max_points, known)
            out[name] = [_point(p) for p in points]
    return {name: out[name] for name in sorted(out) if out[name]}


def columnar(history: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[Any]]]:
    """`history`'s answer as columns, what chart libraries take:
    {name: {"step": [...], "epoch": [...], "value": [...], "time": [...]}}."""
    return {
        name: {key: [p[key] for p in points] for key in ("step", "epoch", "value", "time")}
        for name, points in history.items()
    }


def _point(p: Sequence[Any]) -> dict[str, Any]:
    return {"step": p[0], "epoch": p[1], "value": p[2], "time": p[3]}


def _series(
    session: Session, job_id: str, names: list[str], after: int | None, before: int | None
) -> Iterator[tuple[str, list[Point]]]:
    """The whole series of each of `names`, after < step < before, in one query."""
    if not names:
        return
    stmt = select(
        CHUNKS.c.name, CHUNKS.c.steps, CHUNKS.c.epochs, CHUNKS.c["values"], CHUNKS.c.times
    ).where(CHUNKS.c.job_id == job_id, CHUNKS.c.name.in_(names))
    if after is not None:
        stmt = stmt.where(CHUNKS.c.last_step > after)
    if before is not None:
        stmt = stmt.where(CHUNKS.c.first_step < before)
    rows = session.execute(stmt.order_by(CHUNKS.c.name, CHUNKS.c.first_step))
    for name, group in itertools.groupby(rows, key=lambda row: row[0]):
        yield name, _merged([tuple(row[1:]) for row in group], after=after, before=before)


def _merged(
    parts: list[tuple[bytes, ...]],
    *,
    after: int | None = None,
    before: int | None = None,
    limit: int | None = None,
) -> list[Point]:
    """The points of a series' chunks (their packed arrays), by step, after < step < before,
    at most `limit`."""
    if not parts:
        return []
    return as_points(*merged_arrays(parts, after=after, before=before, limit=limit))


def merged_arrays(
    parts: Sequence[Sequence[bytes]],
    *,
    after: int | None = None,
    before: int | None = None,
    limit: int | None = None,
    dtypes: Sequence[str] = tuple(DTYPES.values()),
) -> list[np.ndarray]:
    """`_merged` as arrays: the columns of `dtypes` (steps first), from rows of the chunks'
    packed columns in that order."""
    arrays = [
        [np.frombuffer(blob, dtype) for blob, dtype in zip(row, dtypes, strict=True)]
        for row in parts
    ]
    columns = [np.concatenate(column) for column in zip(*arrays, strict=True)]
    steps = columns[0]
    if len(steps) > 1 and not bool(np.all(steps[1:] > steps[:-1])):
        # chunks of late or overlapping batches interleave with others
        order = np.argsort(steps, kind="stable")
        columns = [column[order] for column in columns]
        steps = columns[0]
    keep = np.ones(len(steps), dtype=bool)
    if after is not None:
        keep &= steps > after
    if before is not None:
        keep &= steps < before
    if not keep.all():
        columns = [column[keep] for column in columns]
    if limit is not None:
        columns = [column[:limit] for column in columns]
    return columns


def _points(
    session: Session,
    job_id: str,
    name: str,
    *,
    after: int | None = None,
    before: int | None = None,
    limit: int | None = None,
) -> list[Point]:
    """The series' points with after < step < before, by step, at most `limit` of them."""
    where = [CHUNKS.c.job_id == job_id, CHUNKS.c.name == name]
    if after is not None:
        where.append(CHUNKS.c.last_step > after)
    if before is not None:
        where.append(CHUNKS.c.first_step < before)
    if limit is not None:
        last_needed = _chunks_for(session, where, after, limit)
        if last_needed is None:
            return []
        where.append(CHUNKS.c.first_step <= last_needed)
    arrays = select(CHUNKS.c.steps, CHUNKS.c.epochs, CHUNKS.c["values"], CHUNKS.c.times).where(
        *where
    )
    parts = [tuple(row) for row in session.execute(arrays.order_by(CHUNKS.c.first_step))]
    return _merged(parts, after=after, before=before, limit=limit)


def _chunks_for(session: Session, where: list[Any], after: int | None, limit: int) -> int | None:
    """The first_step of the last chunk (by first_step) to read for the first `limit`
    points past `after` of the chunks matching `where`; None when none match.

    Reads only the chunks' step ranges and sizes (a few bytes each). The points of
    the chunks taken are complete below the next chunk's first step; a chunk that
    starts at or before `after` counts for none (it may hold points before it).
    """
    stmt = select(CHUNKS.c.first_step, CHUNKS.c.last_step, CHUNKS.c["count"]).where(*where)
    last_needed = None
    complete = 0
    pending: list[tuple[int, int]] = []  # (last_step, count) of chunks taken, not yet counted
    for first_step, last_step, count in session.execute(stmt.order_by(CHUNKS.c.first_step)):
        complete += sum(c for last, c in pending if last < first_step)
        pending = [(last, c) for last, c in pending if last >= first_step]
        if complete >= limit:
            break
        if after is None or first_step > after:
            pending.append((last_step, count))
        last_needed = first_step
    return last_needed


def _last_step(session: Session, job_id: str, name: str) -> int | None:
    stmt = select(func.max(CHUNKS.c.last_step)).where(
        CHUNKS.c.job_id == job_id, CHUNKS.c.name == name
    )
    return session.execute(stmt).scalar_one()


def _last_step_upto(session: Session, job_id: str, name: str, until: int) -> int:
    """The series' last step <= until (there is one). It lies in a chunk starting at or
    after the last chunk start <= until (chunks of late batches may overlap)."""
    where = [CHUNKS.c.job_id == job_id, CHUNKS.c.name == name, CHUNKS.c.first_step <= until]
    last_start = select(func.max(CHUNKS.c.first_step)).where(*where).scalar_subquery()
    stmt = select(CHUNKS.c.steps).where(*where, CHUNKS.c.last_step >= last_start)
    found = []
    for (blob,) in session.execute(stmt):
        steps = np.frombuffer(blob, DTYPES["steps"])
        found.extend(steps[steps <= until][-1:].tolist())  # a chunk's steps increase
    return max(found)


def _downsampled(
    session: Session,
    job_id: str,
    name: str,
    since_step: int | None,
    until_step: int | None,
    max_points: int,
    known: tuple[int, int, int] | None = None,
) -> list[Point]:
    """`known`: the whole series' (points, first step, last step), when the caller has it."""
    before = None if until_step is None else until_step + 1
    if known is not None and known[0] > max_points:
        lo, hi = known[1], known[2]
    else:
        head = _points(session, job_id, name, after=since_step, before=before, limit=max_points + 1)
        if len(head) <= max_points:
            return head  # short enough already: every point
        lo = head[0][0]
        last = _last_step(session, job_id, name)
        assert last is not None  # head is not empty
        if until_step is None or last <= until_step:
            hi = last
        else:
            hi = _last_step_upto(session, job_id, name, until_step)
    budget = max(1, max_points // 4)
    k = 0
    while (hi >> k) - (lo >> k) + 1 > budget:
        k += 1
    level = metric_rollups.level_for(k)
    if level is None:  # buckets narrower than any rollup: at most 2**k * budget raw points
        raw = _points(session, job_id, name, after=since_step, before=hi + 1)
        buckets = metric_rollups.regrouped(metric_rollups.bucketed(raw, 0), k)
    else:
        first_block, last_block = lo >> level, hi >> level
        blocks = dict(metric_rollups.read(session, job_id, name, level, first_block, last_block))
        # A stored block that reaches past the range (before since_step, after until_step)
        # holds points outside it: rebuild it from finer blocks and raw points.
        start = since_step + 1 if since_step is not None else 0
        end = until_step + 1 if until_step is not None else None
        for block in {first_block, last_block}:
            lo_cut = start > block << level
            hi_cut = end is not None and end < (block + 1) << level
            if block in blocks and (lo_cut or hi_cut):
                cut = _span_summary(
                    session,
                    job_id,
                    name,
                    max(start, block << level),
                    min(end, (block + 1) << level) if end is not None else (block + 1) << level,
                    level,
                )
                if cut is None:
                    del blocks[block]
                else:
                    blocks[block] = cut
        buckets = metric_rollups.regrouped(sorted(blocks.items()), k - level)
    return [p for _, summary in sorted(buckets.items()) for p in summary.points()]


def _span_summary(
    session: Session, job_id: str, name: str, start: int, end: int, below: int
) -> metric_rollups.Summary | None:
    """The summary of steps [start, end) (within one block at level `below`), from stored
    blocks of finer levels and raw points at its ragged ends; None when it holds no point."""
    pieces, inner_start, inner_end = metric_rollups.tiling(start, end, below)
    parts = metric_rollups.read_blocks(session, job_id, name, pieces)
    for lo, hi in ((start, inner_start), (inner_end, end)):
        if hi > lo:
            raw = _points(session, job_id, name, after=lo - 1, before=hi)
            if raw:
                parts.append(metric_rollups.Summary.of(raw))
    if not parts:
        return None
    summary = parts[0]
    for part in parts[1:]:
        summary = summary.merge(part)
    return summary
