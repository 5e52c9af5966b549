"""API throughput: GET /api/v1/jobs/{id} under 64 concurrent keep-alive clients.

torchyard (auth, ownership check, job read, JobOut) against the framework floor:
a bare FastAPI route answering the same path with a constant JSON document of the
same size, served by the same uvicorn setup (the same number of processes on one
loopback socket). Rounds alternate between the two, so drift on a shared machine
hits both alike. Prints req/s, p50 and p99 latency of each, and torchyard/floor.

    .venv/bin/python bench/api_throughput.py [--db postgres|sqlite] [--processes 2]
        [--clients 64] [--seconds 4] [--rounds 3]

The load is a minimal HTTP/1.1 keep-alive client on asyncio in this process
(tens of microseconds of CPU a request): on a 2-core machine an httpx client
would spend more CPU than the server and measure itself.

Goal: >= 2,000 req/s with p99 <= 50 ms (Postgres, Redis). Exits non-zero only on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class Load:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Load) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.seconds += other.seconds
        self.latencies += other.latencies


async def _connection(
    port: int, request: bytes, until: float, out: Load, first_error: list[str]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            out.latencies.append(time.perf_counter() - started)
            out.requests += 1
            if head[9:12] != b"200":
                out.errors += 1
                if not first_error:
                    first_error.append((head + body)[:300].decode(errors="replace"))
    finally:
        writer.close()


async def _load(port: int, request: bytes, clients: int, seconds: float) -> tuple[Load, list[str]]:
    out, first_error = Load(), []
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(
        *(_connection(port, request, until, out, first_error) for _ in range(clients))
    )
    out.seconds = time.perf_counter() - started
    return out, first_error


def load(port: int, path: str, token: str, clients: int, seconds: float) -> Load:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\nAccept: application/json\r\n\r\n"
    ).encode()
    out, first_error = asyncio.run(_load(port, request, clients, seconds))
    if first_error:
        raise RuntimeError(f"{out.errors} of {out.requests} requests failed: {first_error[0]}")
    return out


def a_running_job(url: str, settings: Settings) -> tuple[str, str]:
    """A running job with progress and latest metrics (what a watcher polls); its id and a token."""
    with client(url, settings.token) as user, client(url, settings.worker_token) as worker:
        job = submit(user, job_spec(upload_dataset(user), epochs=20))
        attempt = claim(worker, job["id"])
        with client(url, attempt["token"]) as reporter:
            points = [
                {
                    "name": name,
                    "step": step,
                    "epoch": step // 100,
                    "value": 1 / (step + 1),
                    "time": 1.7e9 + step,
                }
                for step in range(0, 500, 50)
                for name in ("loss", "accuracy", "val_loss", "val_accuracy")
            ]
            expect(reporter.post(f"/worker/jobs/{job['id']}/metrics", json={"points": points}), 200)
            progress = {"epoch": 4, "epochs": 20, "step": 450, "steps_per_epoch": 100}
            expect(
                reporter.post(f"/worker/jobs/{job['id']}/heartbeat", json={"progress": progress}),
                200,
            )
        return job["id"], settings.token


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--processes", type=int, default=2, help="uvicorn processes of each app")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with scratch() as tmp, database(args.db, Path(tmp)) as db_url:
        settings = Settings(Path(tmp) / "home", db_url, REDIS_URL)
        migrate(db_url)
        with Served("torchyard", processes=args.processes, env=settings.env()) as ours:
            job_id, token = a_running_job(ours.url, settings)
            path = f"/api/v1/jobs/{job_id}"
            with client(ours.url, token) as user:
                reply = user.get(f"/jobs/{job_id}")
                document = expect(reply, 200)
            size = len(reply.content)
            body_file = Path(tmp) / "job.json"
            body_file.write_text(json.dumps(document))
            with Served("floor", processes=args.processes, floor_body=body_file) as floor:
                with client(floor.url) as bare:
                    floor_size = len(bare.get(f"/jobs/{job_id}").content)
                targets = {"torchyard": ours.port, "floor": floor.port}
                totals = {name: Load() for name in targets}
                for port in targets.values():  # warm-up: connections, pools, caches
                    load(port, path, token, args.clients, 1.0)
                for n in range(args.rounds):
                    order = list(targets) if n % 2 == 0 else list(reversed(targets))
                    for name in order:
                        totals[name].add(
                            load(targets[name], path, token, args.clients, args.seconds)
                        )

    rows = []
    for name, total in totals.items():
        rows.append(
            [
                name,
                total.requests / total.seconds,
                percentile(total.latencies, 50) * 1000,
                percentile(total.latencies, 99) * 1000,
                total.requests,
            ]
        )
    ours_rps, floor_rps = rows[0][1], rows[1][1]
    print(
        f"GET /api/v1/jobs/{{id}}, {args.clients} clients, {args.processes} uvicorn "
        f"process(es), {args.db}, {args.rounds} x {args.seconds:g} s each, "
        f"body {size} B (floor {floor_size} B)"
    )
    print_table(["", "req/s", "p50 ms", "p99 ms", "requests"], rows)
    print(
        f"torchyard/floor: throughput {ours_rps / floor_rps:.2f}, "
        f"p50 {rows[0][2] / rows[1][2]:.2f}, p99 {rows[0][3] / rows[1][3]:.2f}"
    )
    print("goal: >= 2,000 req/s and p99 <= 50 ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
