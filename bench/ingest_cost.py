"""Where a metrics batch's time goes: the report's own function, in process, per part.

Runs what POST /api/v1/worker/jobs/{id}/metrics runs after the HTTP layer
(`routes.worker._record_metrics`: lock by token, parse, store, commit) for
`--batches` batches of `--batch` points of one series, on a fresh Postgres
database, and splits the mean time of a batch into: each SQL statement (time in
the driver, round trip included; BEGIN goes with the first), the commit, the body's
parse, and the rest (our Python: packing, rollups, ORM). On Postgres the report's
writes go with the COMMIT in one pipeline (app/store/metric_reports.py): their
time is in the COMMIT row. `--generic` runs them one by one instead (SQLite's
path), to see each. Not a comparison: it says where to look.

`--compare` is one: the report as it was (one by one, pglz compression), one by
one with lz4, and as it is (pipelined, lz4), each on a job of its own, batch by
batch in turn (a rotating order), so a busy machine slows all three alike.
Prints ms per batch and each one's ratio to the first.

    .venv/bin/python bench/ingest_cost.py [--batch 1000] [--batches 300] [--generic | --compare]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_harness import database, migrate, print_table, scratch
from sqlalchemy import event, text

from app.api.routes.worker import _record_metrics
from app.api.schemas import MetricsIn
from app.db import make_engine, make_sessions, session_scope
from app.ids import new_id
from app.models import Job
from app.protocol import record_metrics
from app.store import attempts, users


def body(start: int, count: int) -> bytes:
    points = [
        {
            "name": "loss",
            "step": s,
            "epoch": s // 10_000,
            "value": 2.0 * math.exp(-s / 3e5) + 0.05 * math.sin(s * 0.7),
            "time": 1.7e9 + s * 0.01,
        }
        for s in range(start, start + count)
    ]
    return json.dumps({"points": points}).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--generic", action="store_true", help="no pipeline: one by one")
    parser.add_argument("--compare", action="store_true", help="before and now, interleaved")
    args = parser.parse_args()
    with scratch() as tmp, database("postgres", Path(tmp)) as url:
        migrate(url)
        if args.compare:
            return compare(url, args.batch, args.batches)
        engine = make_engine(url)
        sessions = make_sessions(engine)
        spent: dict[str, float] = collections.defaultdict(float)
        counts: dict[str, int] = collections.defaultdict(int)

        @event.listens_for(engine, "before_cursor_execute")
        def _before(conn: Any, *_: Any) -> None:
            conn.info["started"] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def _after(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            key = "SQL " + " ".join(statement.split()[:3])[:48]
            spent[key] += time.perf_counter() - conn.info["started"]
            counts[key] += 1

        with session_scope(sessions) as session:
            user = users.create_user(session, "bench")
            job = Job(id=new_id(), user_id=user.id, name="b", spec={}, fields={}, queue="cpu")
            session.add(job)
        with session_scope(sessions) as session:
            token = attempts.claim(session, job.id, "bench", lease_s=60, max_running=None).token

        bodies = [body(n * args.batch, args.batch) for n in range(args.batches)]
        spent.clear()
        counts.clear()
        total = parse = commit = 0.0
        for raw in bodies:
            started = time.perf_counter()
            MetricsIn.model_validate_json(raw)
            parse += time.perf_counter() - started
            started = time.perf_counter()
            with CommitTimer() as timer:
                if args.generic:
                    with session_scope(sessions) as session:
                        locked = attempts.lock_by_token(session, token, job.id)
                        points = list(MetricsIn.model_validate_json(raw).points)
                        record_metrics(session, locked, points, 60, pipeline=False)  # type: ignore[arg-type]
                else:
                    _record_metrics(sessions, token, job.id, raw, 60)
            total += time.perf_counter() - started
            commit += timer.seconds
    n = args.batches
    sql = sum(spent.values())
    rows = [
        [k, v / n * 1000, counts[k] / n] for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
    ]
    rows += [
        ["COMMIT" if args.generic else "writes + COMMIT (pipeline)", commit / n * 1000, 1],
        ["parse and validate (pydantic)", parse / n * 1000, "-"],
        ["our Python (pack, rollups, ORM)", (total - sql - commit - parse) / n * 1000, "-"],
        ["a batch, all", total / n * 1000, "-"],
    ]
    how = "one by one (generic)" if args.generic else "pipelined"
    print(
        f"postgres, writes {how}; {n} batches of {args.batch:,} points, one series; "
        "in process, no HTTP"
    )
    print_table(["part", "ms a batch", "per batch"], rows)
    print(f"{n * args.batch / total:,.0f} points/s")
    return 0


# name: (pipelined, TOAST compression)
CONFIGS = {
    "before: one by one, pglz": (False, "pglz"),
    "one by one, lz4": (False, "lz4"),
    "now: pipelined, lz4": (True, "lz4"),
}


def compare(url: str, batch: int, batches: int) -> int:
    reporters = []
    for name, (pipelined, method) in CONFIGS.items():
        engine = make_engine(url)

        def _compression(dbapi_connection: Any, _record: Any, method: str = method) -> None:
            # after make_engine's own listener: this one's choice stands
            dbapi_connection.execute(f"SET default_toast_compression = {method}")
            dbapi_connection.commit()

        event.listen(engine, "connect", _compression)
        sessions = make_sessions(engine)
        with session_scope(sessions) as session:
            user = users.create_user(session, f"bench-{len(reporters)}")
            job = Job(id=new_id(), user_id=user.id, name="b", spec={}, fields={}, queue="cpu")
            session.add(job)
        with session_scope(sessions) as session:
            token = attempts.claim(session, job.id, "bench", lease_s=60, max_running=None).token
        reporters.append((name, pipelined, sessions, job.id, token))
    bodies = [body(n * batch, batch) for n in range(batches)]
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for n, raw in enumerate(bodies):
        turn = reporters[n % 3 :] + reporters[: n % 3]
        for name, pipelined, sessions, job_id, token in turn:
            started = time.perf_counter()
            # what the route runs (routes.worker._record_metrics), the path chosen
            with session_scope(sessions) as session:
                job = attempts.lock_by_token(session, token, job_id)
                points = list(MetricsIn.model_validate_json(raw).points)
                record_metrics(session, job, points, 60, pipeline=pipelined)  # type: ignore[arg-type]
            times[name].append(time.perf_counter() - started)
    first = statistics.mean(times[next(iter(CONFIGS))])
    rows = [
        [
            name,
            statistics.mean(spent) * 1000,
            statistics.median(spent) * 1000,
            f"{batch / statistics.mean(spent):,.0f}",
            first / statistics.mean(spent),
        ]
        for name, spent in times.items()
    ]
    print(f"postgres; {batches} batches of {batch:,} points each, interleaved; in process, no HTTP")
    print_table(["report", "ms a batch (mean)", "median", "points/s", "speed-up"], rows)
    with session_scope(reporters[0][2]) as session:
        methods = session.execute(
            text(
                "SELECT job_id, pg_column_compression(steps), count(*) FROM metric_chunks "
                "GROUP BY 1, 2"
            )
        ).all()
    jobs = {job_id: name for name, _, _, job_id, _ in reporters}
    print("chunks by compression: " + ", ".join(f"{jobs[j]}: {n} {m}" for j, m, n in methods))
    return 0


class CommitTimer:
    """The time spent in the driver's COMMIT (a round trip and the WAL flush) while in use."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> CommitTimer:
        import psycopg

        real = psycopg.Connection.commit

        def timed(conn: Any) -> None:
            started = time.perf_counter()
            try:
                real(conn)
            finally:
                self.seconds += time.perf_counter() - started

        self._real = real
        psycopg.Connection.commit = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        import psycopg

        psycopg.Connection.commit = self._real  # type: ignore[method-assign]


if __name__ == "__main__":
    raise SystemExit(main())
