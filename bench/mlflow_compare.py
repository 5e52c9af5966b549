"""torchyard and an MLflow 3 tracking server side by side: metric ingest and history reads.

Both servers run on this machine against the local Postgres (a fresh database each,
created and dropped here), with 2 server processes each, and are driven the same
way: plain HTTP from one client (httpx), one metric of one run/job.

1. Ingest: `--points` points in batches of `--batch` (1,000: MLflow's log-batch
   limit), batches alternating between the two servers. torchyard: the worker
   report, POST /api/v1/worker/jobs/{id}/metrics; MLflow: POST
   /api/2.0/mlflow/runs/log-batch. Points/s over all batches, batch p50.
2. Downsampled history, 1,000 points of the whole series: torchyard GET
   /api/v1/jobs/{id}/metrics?names=loss&max_points=1000; MLflow GET
   /ajax-api/2.0/mlflow/metrics/get-history-bulk-interval?max_results=1000 (what
   its UI charts read). p50 over `--reads`, alternating.
3. Full history: torchyard GET /api/v1/jobs/{id}/metrics?names=loss (and
   `&format=columnar`); MLflow GET /api/2.0/mlflow/metrics/get-history (all pages).
   p50 over `--full-reads`, and the peak growth of the serving processes' RSS
   during the read (sampled every 5 ms from /proc; the largest over the processes).

MLflow runs from its own virtual environment (never our dependencies):

    python3 -m venv /work/wt/mlflow-venv && /work/wt/mlflow-venv/bin/pip install mlflow psycopg2-binary
    .venv/bin/python bench/mlflow_compare.py --mlflow-venv /work/wt/mlflow-venv
        [--points 1000000] [--batch 1000] [--reads 10] [--full-reads 3] [--processes 2]

Prints one table per part and a table of ratios (torchyard over MLflow: higher is
better for torchyard). Exits non-zero only on an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

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
    scratch,
    submit,
    upload_dataset,
)

NAME = "loss"


def series(start: int, count: int) -> list[tuple[int, float, float]]:
    """(step, value, time) of a loss curve with noise and the odd spike."""
    return [
        (
            step,
            2.0 * math.exp(-step / 300_000)
            + 0.05 * math.sin(step * 0.7)
            + (3.0 if step % 99_991 == 0 else 0.0),
            1.7e9 + step * 0.01,
        )
        for step in range(start, start + count)
    ]


# ------------------------------------------------------------------ processes


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRss:
    """The largest growth of any of `pids`' RSS over its value at start, while in use."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.start = {p: rss_kib(p) for p in pids}
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.pids:
                self.peak[p] = max(self.peak[p], rss_kib(p) - self.start[p])
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        return max(self.peak.values()) / 1024


class MlflowServer:
    """`mlflow server` from its own venv, `processes` workers, on a Postgres database."""

    def __init__(self, venv: Path, db_url: str, artifacts: Path, processes: int):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        argv = [
            str(venv / "bin" / "mlflow"),
            "server",
            "--backend-store-uri",
            db_url,
            "--default-artifact-root",
            artifacts.as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(processes),
        ]
        self.log = artifacts.parent / "mlflow-server.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("mlflow server did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


# ------------------------------------------------------------------ the two sides


class Ours:
    def __init__(self, api: Served, settings: Settings):
        self.user = client(api.url, settings.token)
        worker = client(api.url, settings.worker_token)
        self.job = submit(self.user, job_spec(upload_dataset(self.user)))["id"]
        self.reporter = client(api.url, claim(worker, self.job)["token"])
        worker.close()
        self.pids = [pid for proc in api.procs for pid in tree(proc.pid)]

    def body(self, points: list[tuple[int, float, float]]) -> bytes:
        rows = [
            {"name": NAME, "step": s, "epoch": s // 10_000, "value": v, "time": t}
            for s, v, t in points
        ]
        return json.dumps({"points": rows}).encode()

    def post(self, body: bytes, count: int) -> None:
        reply = expect(
            self.reporter.post(
                f"/worker/jobs/{self.job}/metrics",
                content=body,
                headers={"Content-Type": "application/json"},
            ),
            200,
        )
        if reply["inserted"] != count:
            raise RuntimeError(f"torchyard inserted {reply['inserted']} of {count}")

    def sampled(self, max_points: int) -> int:
        params = {"names": NAME, "max_points": max_points}
        return len(expect(self.user.get(f"/jobs/{self.job}/metrics", params=params), 200)[NAME])

    def full(self, columnar: bool = False) -> tuple[int, int]:
        params = {"names": NAME, **({"format": "columnar"} if columnar else {})}
        response = self.user.get(f"/jobs/{self.job}/metrics", params=params)
        body = expect(response, 200)[NAME]
        return len(body["step"] if columnar else body), len(response.content)

    def close(self) -> None:
        self.user.close()
        self.reporter.close()


class Mlflow:
    def __init__(self, server: MlflowServer):
        self.http = httpx.Client(base_url=server.url, timeout=600)
        created = expect(
            self.http.post("/api/2.0/mlflow/experiments/create", json={"name": "b"}), 200
        )
        run = expect(
            self.http.post(
                "/api/2.0/mlflow/runs/create",
                json={"experiment_id": created["experiment_id"], "start_time": 0},
            ),
            200,
        )
        self.run_id = run["run"]["info"]["run_id"]
        self.pids = tree(server.proc.pid)

    def body(self, points: list[tuple[int, float, float]]) -> bytes:
        metrics = [
            {"key": NAME, "value": v, "timestamp": int(t * 1000), "step": s} for s, v, t in points
        ]
        return json.dumps({"run_id": self.run_id, "metrics": metrics}).encode()

    def post(self, body: bytes, count: int) -> None:
        expect(
            self.http.post(
                "/api/2.0/mlflow/runs/log-batch",
                content=body,
                headers={"Content-Type": "application/json"},
            ),
            200,
        )

    def sampled(self, max_points: int) -> int:
        params = {"run_ids": self.run_id, "metric_key": NAME, "max_results": max_points}
        url = "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval"
        return len(expect(self.http.get(url, params=params), 200).get("metrics", []))

    def full(self) -> tuple[int, int]:
        count = size = 0
        token = None
        while True:
            params = {"run_id": self.run_id, "metric_key": NAME}
            if token:
                params["page_token"] = token
            response = self.http.get("/api/2.0/mlflow/metrics/get-history", params=params)
            page = expect(response, 200)
            count += len(page.get("metrics", []))
            size += len(response.content)
            token = page.get("next_page_token")
            if not token:
                return count, size

    def close(self) -> None:
        self.http.close()


# ------------------------------------------------------------------ the run


def timed(call: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = call(*args)
    return time.perf_counter() - started, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlflow-venv", type=Path, default=Path("/work/wt/mlflow-venv"))
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--reads", type=int, default=10)
    parser.add_argument("--full-reads", type=int, default=3)
    parser.add_argument("--max-points", type=int, default=1_000)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    if not (args.mlflow_venv / "bin" / "mlflow").exists():
        parser.error(f"no {args.mlflow_venv}/bin/mlflow: create that venv first (see --help)")

    with (
        scratch() as tmp,
        database("postgres", Path(tmp)) as ours_db,
        database("postgres", Path(tmp)) as mlflow_db,
    ):
        settings = Settings(Path(tmp) / "home", ours_db, REDIS_URL)
        migrate(ours_db)
        (Path(tmp) / "mlruns").mkdir()
        mlflow_server = MlflowServer(
            args.mlflow_venv,
            mlflow_db.replace("+psycopg://", "+psycopg2://"),  # the driver its venv has
            Path(tmp) / "mlruns",
            args.processes,
        )
        try:
            with Served("torchyard", processes=args.processes, env=settings.env()) as api:
                ours, theirs = Ours(api, settings), Mlflow(mlflow_server)
                try:
                    results = run(args, ours, theirs)
                finally:
                    ours.close()
                    theirs.close()
        finally:
            mlflow_server.stop()
    report(args, results)
    return 0


def run(args: argparse.Namespace, ours: Ours, theirs: Mlflow) -> dict[str, Any]:
    ingest: dict[str, list[float]] = {"torchyard": [], "mlflow": []}
    for n, start in enumerate(range(0, args.points, args.batch)):
        points = series(start, min(args.batch, args.points - start))
        sides = [("torchyard", ours), ("mlflow", theirs)]
        for label, side in sides if n % 2 == 0 else sides[::-1]:
            body = side.body(points)
            took, _ = timed(side.post, body, len(points))
            ingest[label].append(took)
        if n and n % 100 == 0:
            print(f"  {start + args.batch:,} points ingested", file=sys.stderr, flush=True)

    sampled: dict[str, list[float]] = {"torchyard": [], "mlflow": []}
    returned = {}
    for side in (ours, theirs):
        side.sampled(args.max_points)  # warm-up
    for n in range(args.reads):
        sides = [("torchyard", ours), ("mlflow", theirs)]
        for label, side in sides if n % 2 == 0 else sides[::-1]:
            took, count = timed(side.sampled, args.max_points)
            sampled[label].append(took)
            returned[label] = count

    full: dict[str, list[tuple[float, int, int, float]]] = {
        "torchyard": [],
        "torchyard columnar": [],
        "mlflow": [],
    }
    calls = {
        "torchyard": (ours.pids, lambda: ours.full(False)),
        "torchyard columnar": (ours.pids, lambda: ours.full(True)),
        "mlflow": (theirs.pids, theirs.full),
    }
    for _ in range(args.full_reads):
        for label, (pids, call) in calls.items():
            with PeakRss(pids) as peak:
                took, (count, size) = timed(call)
            if count != args.points:
                raise RuntimeError(f"{label}: full read returned {count} points")
            full[label].append((took, count, size, peak.growth_mib))
    return {"ingest": ingest, "sampled": sampled, "returned": returned, "full": full}


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    ingest, sampled, full = results["ingest"], results["sampled"], results["full"]
    print(
        f"postgres; {args.points:,} points of one metric, batches of {args.batch:,}; "
        f"{args.processes} server processes each; one client, plain HTTP"
    )
    rates = {label: len(t) * args.batch / sum(t) for label, t in ingest.items()}
    print_table(
        ["ingest", "points/s", "batch p50 ms", "batch p99 ms"],
        [
            [label, rates[label], percentile(t, 50) * 1000, percentile(t, 99) * 1000]
            for label, t in ingest.items()
        ],
    )
    print()
    print_table(
        ["downsampled history", "p50 ms", "p99 ms", "points returned"],
        [
            [label, percentile(t, 50) * 1000, percentile(t, 99) * 1000, results["returned"][label]]
            for label, t in sampled.items()
        ],
    )
    print()
    print_table(
        ["full history", "p50 s", "MB", "peak RSS growth MiB (max over reads)"],
        [
            [
                label,
                percentile([r[0] for r in rows], 50),
                rows[0][2] / 1e6,
                max(r[3] for r in rows),
            ]
            for label, rows in full.items()
        ],
    )
    print()

    def p50(label: str) -> float:
        return percentile([r[0] for r in full[label]], 50)

    def rss(label: str) -> float:
        return max(r[3] for r in full[label])

    print_table(
        ["torchyard vs MLflow", "ratio (x times better)"],
        [
            ["ingest points/s", rates["torchyard"] / rates["mlflow"]],
            [
                "downsampled 1M history (p50 time)",
                percentile(sampled["mlflow"], 50) / percentile(sampled["torchyard"], 50),
            ],
            ["full 1M history (p50 time)", p50("mlflow") / p50("torchyard")],
            ["full 1M history, columnar (p50 time)", p50("mlflow") / p50("torchyard columnar")],
            ["full history peak RSS growth", rss("mlflow") / max(rss("torchyard"), 0.1)],
            [
                "full history peak RSS growth, columnar",
                rss("mlflow") / max(rss("torchyard columnar"), 0.1),
            ],
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main())
