"""Where a metrics batch's time goes: the report's own function, in process, per part.

Runs what POST /api/v1/worker/jobs/{id}/metrics runs after the HTTP layer
(`routes.worker._record_metrics`: lock by token, parse, store, commit) for
`--batches` batches of `--batch` points of one series, on a fresh Postgres
database, and splits the mean time of a batch into: each SQL statement (time in
the driver, round trip included), the commit, the body's parse, and the rest
(our Python: packing, rollups, ORM). Not a comparison: it says where to look.

    .venv/bin/python bench/ingest_cost.py [--batch 1000] [--batches 300]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_harness import database, migrate, print_table, scratch
from sqlalchemy import event

from app.api.routes.worker import _record_metrics
from app.api.schemas import MetricsIn
from app.db import make_engine, make_sessions, session_scope
from app.ids import new_id
from app.models import Job
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
    args = parser.parse_args()
    with scratch() as tmp, database("postgres", Path(tmp)) as url:
        migrate(url)
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
                _record_metrics(sessions, token, job.id, raw, 60)
            total += time.perf_counter() - started
            commit += timer.seconds
    n = args.batches
    sql = sum(spent.values())
    rows = [
        [k, v / n * 1000, counts[k] / n] for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
    ]
    rows += [
        ["COMMIT", commit / n * 1000, 1],
        ["parse and validate (pydantic)", parse / n * 1000, "-"],
        ["our Python (pack, rollups, ORM)", (total - sql - commit - parse) / n * 1000, "-"],
        ["a batch, all", total / n * 1000, "-"],
    ]
    print(f"postgres; {n} batches of {args.batch:,} points, one series; in process, no HTTP")
    print_table(["part", "ms a batch", "per batch"], rows)
    print(f"{n * args.batch / total:,.0f} points/s")
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
