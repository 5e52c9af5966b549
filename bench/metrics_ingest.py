"""Metrics: ingestion through the worker protocol, and a downsampled history read.

1. Ingest: a worker posts one metric's points in batches (POST
   /api/v1/worker/jobs/{id}/metrics, 5,000 points each) until the job holds
   1,000,000; baseline: the same rows of every 8th batch inserted by one
   executemany per batch, with the database's own driver, into a table of one
   row per point keyed by (job, name, step) -- the classic layout, which
   torchyard used until it stored a batch of a series as one row of packed
   arrays (app/store/metrics.py) -- interleaved with ours. Prints points/s and
   batch latency.
2. History: GET /api/v1/jobs/{id}/metrics?names=loss&max_points=1000 on that
   1,000,000-point series, p50 over 20 reads; baseline: reading all of its points
   with the driver (one SELECT of its chunks, unpacked with numpy: the least a
   full read can cost), interleaved.

    .venv/bin/python bench/metrics_ingest.py [--db postgres|sqlite] [--points 1000000]
        [--batch 5000] [--reads 20] [--baseline-every 8]

Goals (Postgres): ingest >= 100,000 points/s; history read p50 <= 50 ms.
Exits non-zero only on an error.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_harness import (
    REDIS_URL,
    Served,
    Settings,
    claim,
    client,
    database,
    expect,
    job_spec,
    migrate,
    percentile,
    print_table,
    psycopg_dsn,
    scratch,
    submit,
    upload_dataset,
)

NAME = "loss"
TABLE = (
    "CREATE TABLE bench_points (job_id varchar(32), name varchar(128), step bigint, "
    "epoch integer, value double precision, time double precision, "
    "PRIMARY KEY (job_id, name, step))"
)
INSERT = "INSERT INTO bench_points (job_id, name, step, epoch, value, time) VALUES "
SELECT = (
    'SELECT steps, epochs, "values", times FROM metric_chunks '
    "WHERE job_id = {p} AND name = {p} ORDER BY first_step"
)


class Raw:
    """The baseline's direct line to the database: the backend's own driver, no ORM."""

    def __init__(self, database_url: str):
        if database_url.startswith("sqlite"):
            self.conn: Any = sqlite3.connect(database_url.removeprefix("sqlite:///"))
            self.mark = "?"
        else:
            import psycopg

            self.conn = psycopg.connect(psycopg_dsn(database_url))
            self.mark = "%s"
        self.conn.execute(TABLE)
        self.conn.commit()

    def insert(self, rows: list[tuple[Any, ...]]) -> None:
        cursor = self.conn.cursor()
        cursor.executemany(INSERT + "(" + ", ".join([self.mark] * 6) + ")", rows)
        self.conn.commit()

    def read_all(self, job_id: str) -> int:
        cursor = self.conn.cursor()
        cursor.execute(SELECT.format(p=self.mark), (job_id, NAME))
        columns = list(zip(*cursor.fetchall(), strict=True))
        self.conn.commit()
        arrays = [
            np.concatenate([np.frombuffer(blob, dtype) for blob in column])
            for column, dtype in zip(columns, ("<i8", "<i4", "<f8", "<f8"), strict=True)
        ]
        return len(arrays[0])

    def close(self) -> None:
        self.conn.close()


def series(start: int, count: int) -> list[dict[str, Any]]:
    """A loss curve with noise and the odd spike, as a training run reports it."""
    return [
        {
            "name": NAME,
            "step": step,
            "epoch": step // 10_000,
            "value": 2.0 * math.exp(-step / 300_000)
            + 0.05 * math.sin(step * 0.7)
            + (3.0 if step % 99_991 == 0 else 0.0),
            "time": 1.7e9 + step * 0.01,
        }
        for step in range(start, start + count)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--reads", type=int, default=20)
    parser.add_argument("--max-points", type=int, default=1_000)
    parser.add_argument(
        "--baseline-every", type=int, default=8, help="time the baseline on every Nth batch"
    )
    args = parser.parse_args()
    if args.points % args.batch:
        parser.error("--points must be a multiple of --batch")

    with scratch() as tmp, database(args.db, Path(tmp)) as db_url:
        settings = Settings(Path(tmp) / "home", db_url, REDIS_URL)
        migrate(db_url)
        with Served("torchyard", processes=1, env=settings.env()) as api:
            user = client(api.url, settings.token)
            worker = client(api.url, settings.worker_token)
            dataset = upload_dataset(user)
            ours_job = submit(user, job_spec(dataset))["id"]
            base_job = submit(user, job_spec(dataset))["id"]
            reporter = client(api.url, claim(worker, ours_job)["token"])
            raw = Raw(db_url)
            try:
                ingest = run_ingest(args, reporter, raw, ours_job, base_job)
                reads = run_reads(args, user, raw, ours_job)
            finally:
                raw.close()
                for c in (user, worker, reporter):
                    c.close()

    print(
        f"{args.db}; {args.points:,} points of one metric in batches of {args.batch:,}; "
        "one API process"
    )
    print_table(
        ["ingest", "points/s", "batch p50 ms", "batch p99 ms", "batches"],
        [
            [
                name,
                rate(times, args.batch),
                percentile(times, 50) * 1000,
                percentile(times, 99) * 1000,
                len(times),
            ]
            for name, times in ingest.items()
        ],
    )
    ours_rate = rate(ingest["torchyard"], args.batch)
    base_rate = rate(ingest["executemany"], args.batch)
    print(f"torchyard/executemany: {ours_rate / base_rate:.2f}  (goal: >= 100,000 points/s)")
    print()
    print_table(
        ["history read", "p50 ms", "p99 ms", "reads", "points returned"],
        [
            [name, percentile(t, 50) * 1000, percentile(t, 99) * 1000, len(t), n]
            for name, (t, n) in reads.items()
        ],
    )
    ours_p50 = statistics.median(reads["torchyard"][0])
    base_p50 = statistics.median(reads["raw, all points"][0])
    print(
        f"torchyard/raw: {ours_p50 / base_p50:.3f}  "
        f"(max_points={args.max_points}; goal: p50 <= 50 ms)"
    )
    return 0


def run_ingest(
    args: argparse.Namespace, reporter: Any, raw: Raw, ours_job: str, base_job: str
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"torchyard": [], "executemany": []}
    path = f"/worker/jobs/{ours_job}/metrics"
    for n, start in enumerate(range(0, args.points, args.batch)):
        points = series(start, min(args.batch, args.points - start))
        body = json.dumps({"points": points}).encode()
        rows = [(base_job, p["name"], p["step"], p["epoch"], p["value"], p["time"]) for p in points]

        def ours(body: bytes = body, count: int = len(points)) -> None:
            started = time.perf_counter()
            reply = expect(
                reporter.post(path, content=body, headers={"Content-Type": "application/json"}),
                200,
            )
            times["torchyard"].append(time.perf_counter() - started)
            if reply["inserted"] != count:
                raise RuntimeError(f"inserted {reply['inserted']} of {count}")

        def baseline(rows: list[tuple[Any, ...]] = rows) -> None:
            started = time.perf_counter()
            raw.insert(rows)
            times["executemany"].append(time.perf_counter() - started)

        if n % args.baseline_every:
            ours()
        else:
            for step in (ours, baseline) if n // args.baseline_every % 2 == 0 else (baseline, ours):
                step()
    return times


def rate(times: list[float], batch: int) -> float:
    """Points per second over full batches."""
    return len(times) * batch / sum(times)


def run_reads(
    args: argparse.Namespace, user: Any, raw: Raw, ours_job: str
) -> dict[str, tuple[list[float], int]]:
    params = {"names": NAME, "max_points": args.max_points}
    url = f"/jobs/{ours_job}/metrics"
    expect(user.get(url, params=params), 200)  # warm-up
    ours: list[float] = []
    base: list[float] = []
    returned = 0
    raw_reads = 3  # a full read takes seconds: three of them
    for n in range(args.reads):
        started = time.perf_counter()
        body = expect(user.get(url, params=params), 200)
        ours.append(time.perf_counter() - started)
        sampled = body[NAME]
        returned = len(sampled)
        if not 0 < returned <= args.max_points or sampled[-1]["step"] != args.points - 1:
            raise RuntimeError(f"unexpected downsampled series: {returned} points")
        if n % (args.reads // raw_reads or 1) == 0 and len(base) < raw_reads:
            started = time.perf_counter()
            count = raw.read_all(ours_job)
            base.append(time.perf_counter() - started)
            if count != args.points:
                raise RuntimeError(f"raw read found {count} rows")
    return {"torchyard": (ours, returned), "raw, all points": (base, args.points)}


if __name__ == "__main__":
    raise SystemExit(main())
