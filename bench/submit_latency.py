"""Submit -> running: from POST /api/v1/jobs returning to a worker's claim of the job.

A real Celery consumer (a separate process: solo pool, prefetch 1, late acks, the
workers' own Celery config) takes `torchyard.run_job` from Redis and at once
POSTs the claim, as the first thing torchyard's worker does; it notes when the
task arrived and when the claim answered. The API runs as 2 uvicorn processes on
Postgres (or SQLite) with the Redis broker.

Baseline: the raw broker round trip, send_task -> the same consumer receives the
task, without the API or the database. Jobs and baseline messages alternate.
Prints p50/p99 of each and torchyard/baseline.

    .venv/bin/python bench/submit_latency.py [--db postgres|sqlite] [--jobs 100]

Goal: submit -> running p50 <= 50 ms. Exits non-zero only on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_harness import (
    ROOT,
    Served,
    Settings,
    client,
    database,
    expect,
    job_spec,
    migrate,
    percentile,
    print_table,
    python_path,
    scratch,
    upload_dataset,
)

ECHO = "bench.echo"
QUEUE = "cpu"  # where the API sends a CPU job


def celery_app(broker_url: str, home: Path) -> Any:
    from celery import Celery

    from worker.settings import celery_config

    app = Celery("bench-submit-latency", set_as_current=False)
    app.conf.update(celery_config(broker_url, home))
    return app


# ------------------------------------------------------------------ consumer


def consume(broker_url: str, home: Path, api_url: str, worker_token: str, report: str) -> None:
    """The consumer process: a Celery worker whose run_job claims and reports the times."""
    import httpx
    import redis

    app = celery_app(broker_url, home)
    reports = redis.Redis.from_url(broker_url)
    api = httpx.Client(
        base_url=api_url + "/api/v1",
        headers={"Authorization": f"Bearer {worker_token}"},
        timeout=30,
        verify=False,
    )
    worker_name = f"bench:{os.getpid()}"

    @app.task(name="torchyard.run_job")
    def run_job(job_id: str) -> None:
        received = time.monotonic()
        reply = api.post(f"/worker/jobs/{job_id}/claim", json={"worker": worker_name})
        claimed = time.monotonic()
        reports.rpush(
            report,
            json.dumps(
                {
                    "job": job_id,
                    "received": received,
                    "claimed": claimed,
                    "status": reply.status_code,
                }
            ),
        )

    @app.task(name=ECHO)
    def echo(tag: str) -> None:
        reports.rpush(report, json.dumps({"tag": tag, "received": time.monotonic()}))

    app.worker_main(
        [
            "worker",
            "-Q",
            QUEUE,
            "--pool",
            "solo",
            "--concurrency",
            "1",
            "--loglevel",
            "WARNING",
            "-n",
            f"bench-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


# ---------------------------------------------------------------------- main


class Reports:
    """The consumer's notes, read from a Redis list by what they are about."""

    def __init__(self, broker_url: str, key: str):
        import redis

        self.redis = redis.Redis.from_url(broker_url)
        self.key = key

    def wait_for(self, field: str, value: str, timeout_s: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            item = self.redis.blpop([self.key], timeout=max(1, int(left)))
            if item is None:
                continue
            note = json.loads(item[1])
            if note.get(field) == value:
                return note
        raise RuntimeError(f"the consumer did not report {field}={value} within {timeout_s:g} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--processes", type=int, default=2, help="uvicorn processes")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    # a Redis database of its own, so no other consumer of queue `cpu` takes our tasks
    broker_url = f"redis://127.0.0.1:6379/{random.randint(8, 15)}"
    report_key = f"bench:submit-latency:{os.getpid()}"
    with scratch() as tmp, database(args.db, Path(tmp)) as db_url:
        home = Path(tmp) / "home"
        settings = Settings(home, db_url, broker_url)
        env = {**settings.env(), "TORCHYARD_LEASE_S": "3600"}  # claimed jobs stay running
        migrate(db_url)
        with Served("torchyard", processes=args.processes, env=env) as api:
            argv = ["consume", "--broker", broker_url, "--home", str(home), "--api", api.url]
            argv += ["--worker-token", settings.worker_token, "--report", report_key]
            log = Path(tmp) / "consumer.log"
            with log.open("w") as log_file:
                consumer = subprocess.Popen(
                    [sys.executable, __file__, *argv],
                    env={**os.environ, "PYTHONPATH": python_path()},
                    cwd=ROOT,
                    stdout=log_file,  # Celery's banner and warnings
                    stderr=subprocess.STDOUT,
                )
            try:
                figures = measure(args, api.url, settings, broker_url, home, report_key)
            except Exception:
                print(log.read_text()[-3000:], file=sys.stderr)
                raise
            finally:
                consumer.terminate()
                try:
                    consumer.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    consumer.kill()
                Reports(broker_url, report_key).redis.delete(report_key)

    rows = [
        ["POST /jobs -> claimed (torchyard)", *figures["claimed"]],
        ["POST /jobs -> task received", *figures["received"]],
        ["send_task -> received (baseline)", *figures["baseline"]],
        ["POST /jobs itself (response time)", *figures["post"]],
    ]
    print(
        f"submit -> running, {args.db}, Redis broker, {args.processes} uvicorn processes, "
        f"{args.jobs} jobs (after {args.warmup} unmeasured), one Celery consumer (solo pool)"
    )
    print_table(
        ["", "p50 ms", "p99 ms", "max ms"],
        [[name, *(v * 1000 for v in values)] for name, *values in rows],
    )
    ours, base = figures["claimed"], figures["baseline"]
    print(
        f"torchyard/baseline: p50 {ours[0] / base[0]:.1f}, p99 {ours[1] / base[1]:.1f}  "
        "(goal: submit -> running p50 <= 50 ms)"
    )
    return 0


def measure(
    args: argparse.Namespace,
    api_url: str,
    settings: Settings,
    broker_url: str,
    home: Path,
    report_key: str,
) -> dict[str, tuple[float, float, float]]:
    reports = Reports(broker_url, report_key)
    sender = celery_app(broker_url, home)
    sender.send_task(ECHO, args=["ready"], queue=QUEUE)
    reports.wait_for("tag", "ready", timeout_s=60)  # the consumer is up

    samples: dict[str, list[float]] = {"claimed": [], "received": [], "baseline": [], "post": []}
    with client(api_url, settings.token) as user:
        spec = job_spec(upload_dataset(user))

        def ours(record: bool) -> None:
            started = time.monotonic()
            job = expect(user.post("/jobs", json=spec), 201)
            returned = time.monotonic()
            note = reports.wait_for("job", job["id"])
            if note["status"] != 200:
                raise RuntimeError(f"the claim of {job['id']} answered {note['status']}")
            if record:
                samples["post"].append(returned - started)
                samples["received"].append(note["received"] - returned)
                samples["claimed"].append(note["claimed"] - returned)

        def baseline(n: int, record: bool) -> None:
            tag = f"b{n}"
            sent = time.monotonic()
            sender.send_task(ECHO, args=[tag], queue=QUEUE)
            note = reports.wait_for("tag", tag)
            if record:
                samples["baseline"].append(note["received"] - sent)

        for n in range(args.warmup + args.jobs):
            record = n >= args.warmup
            if n % 2:
                ours(record)
                baseline(n, record)
            else:
                baseline(n, record)
                ours(record)
    sender.close()
    return {name: (percentile(v, 50), percentile(v, 99), max(v)) for name, v in samples.items()}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "consume":
        sub = argparse.ArgumentParser()
        for flag in ("--broker", "--home", "--api", "--worker-token", "--report"):
            sub.add_argument(flag, required=True)
        a = sub.parse_args(sys.argv[2:])
        consume(a.broker, Path(a.home), a.api, a.worker_token, a.report)
        raise SystemExit(0)
    raise SystemExit(main())
