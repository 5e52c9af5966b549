"""Load test: 200 concurrent clients polling and streaming for 60 s while two jobs train.

The real service: a fresh Postgres database, Redis, the API as 2 uvicorn processes on
one loopback socket, and two real training workers (`torchyard worker`, each training
its job in a child process). Two jobs are submitted: an MLP on a synthetic NPZ
(`--rows` x 4 features, 3 classes) uploaded through POST /api/v1/datasets, batch
`--batch-size`, step metrics every `--log-every` steps (~15 times a second a job
here), `--epochs` far more than the window needs. The load starts once both jobs
have reported a training step (`running` comes at the claim, before the training
child has imported torch and read the data). Torch runs on `--threads` threads a
worker (default 1: two workers then fill the 2 cores, and the API, Postgres and the
load client compete with training for them, as on a busy small server).

For `--seconds`, `--pollers` dashboards and `--streamers` browsers (100 each by
default), spread over the two jobs:

- a poller, on one keep-alive connection: GET /api/v1/jobs/{id}, then
  GET /api/v1/jobs/{id}/metrics?max_points=200, then `--think-s` of think time
  (default 0.5 s: a dashboard refreshing a loss curve twice a second, brisker than
  most; 100 pollers then offer up to ~400 requests a second, less when answers are
  slow, since each waits for its answer: a closed loop);
- a streamer: GET /api/v1/jobs/{id}/events (server-sent events), reading the stream
  until the window ends. Its figure is the connect latency (request sent -> response
  headers); it counts the events it receives (a new stream starts with the job's
  history) and the longest wait between two pieces of its stream (events come on the
  API's 0.25 s tick while metrics flow). A stream that ends with `end` (the job
  finished) is reopened after 1 s with Last-Event-ID, as EventSource would.

Clients start spread over the first think time, so the 200 do not arrive in one
instant. After the window both jobs must still be `running` (or have `succeeded`);
they are then cancelled (a worker's shutdown would wait for its task), and the
workers, the API and the database are stopped.

Baseline (the framework floor): the same pollers against a bare FastAPI app answering
both paths with constant JSON documents of the same sizes as ours (taken at the
window's end), served the same way, for `--baseline-seconds`, with no training.

Besides the table: the polls' p50 / p99 by 10 s of the window (does the service
degrade as the jobs' series grow?); the same polls from one client without think time
for 3 s after the window, training still on (what a request costs when it does not
queue behind 199 others); the CPU time of the API processes and of this client.

    .venv/bin/python bench/load_test.py [--seconds 60] [--pollers 100] [--streamers 100]
        [--think-s 0.5] [--baseline-seconds 20] [--processes 2] [--threads 1]
        [--rows 400000] [--epochs 1000] [--batch-size 64] [--log-every 20]

The load is a minimal HTTP/1.1 client on asyncio in this process (keep-alive,
Content-Length and chunked bodies, SSE frames split on blank lines): it checks each
answer's status line, headers and framing, and that a JSON body or an event's data
is one object (first and last byte: parsing every metrics body would cost the client
more than the server work it measures). Any non-2xx answer, refused or dropped
connection, malformed answer or SSE frame, or a stream that closes before `end` is
an error; the first few are printed with their reason.

Goal: no errors; report p50/p99. Exits non-zero only on an error of the benchmark
itself (the service or a job failing to start), never on a slow figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_harness import (
    API,
    REDIS_URL,
    Connection,
    Malformed,
    Served,
    Settings,
    Worker,
    client,
    database,
    expect,
    job_spec,
    migrate,
    npz_bytes,
    percentile,
    print_table,
    scratch,
    submit,
    upload_dataset,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RETRY_S = 1.0  # a stream that ended is reopened after this long
SHOWN_ERRORS = 8
ALONE_S = 3.0  # one client's polls after the window
SLICE_S = 10.0  # latencies over the window are also shown by slices this long


# ------------------------------------------------------- a minimal HTTP client


DROPPED = (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError)


# ------------------------------------------------------------------ the load


@dataclass
class Series:
    """One row of the table: requests answered or failed, errors, latencies of answers
    (and when each was sent)."""

    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)

    def answered(self, started: float) -> None:
        self.latencies.append(time.perf_counter() - started)
        self.sent.append(started)

    def by_slice(self, origin: float, seconds: float, slice_s: float) -> list[list[float]]:
        """The latencies of the requests sent in each `slice_s` of the `seconds` from
        `origin` (the last slice also holds those sent after, by a cycle begun before)."""
        last = max(0, int(seconds // slice_s) - 1)
        slices: list[list[float]] = []
        for sent, latency in zip(self.sent, self.latencies, strict=True):
            n = min(int((sent - origin) // slice_s), last)
            slices += [[] for _ in range(n + 1 - len(slices))]
            slices[n].append(latency)
        return slices


@dataclass
class Stream:
    """What one streamer saw."""

    last_id: str = ""
    events: int = 0
    metrics_events: int = 0
    ends: int = 0
    connects: int = 0
    longest_gap_s: float = 0.0


@dataclass
class Load:
    series: dict[str, Series]
    started: float = 0.0
    seconds: float = 0.0
    streams: list[Stream] = field(default_factory=list)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)

    def error(self, row: str, what: str) -> None:
        self.series[row].errors += 1
        self.errors += 1
        if len(self.first_errors) < SHOWN_ERRORS:
            self.first_errors.append(f"{row}: {what}")


POLLS = ("GET /jobs/{id}", "GET /jobs/{id}/metrics")
SSE = "SSE connect"


def json_object(body: bytes) -> bool:
    return body[:1] == b"{" and body[-1:] == b"}"


async def poll(
    port: int,
    token: str,
    job_id: str,
    until: float,
    offset: float,
    think_s: float,
    load: Load,
) -> None:
    """A dashboard: the job, then its downsampled metrics, then think time; until `until`."""
    paths = [f"{API}/jobs/{job_id}", f"{API}/jobs/{job_id}/metrics?max_points=200"]
    conn = Connection(port, token)
    await asyncio.sleep(offset)
    try:
        while time.perf_counter() < until:
            for path, row in zip(paths, POLLS, strict=True):
                series = load.series[row]
                series.requests += 1
                started = time.perf_counter()
                try:
                    status, body = await conn.get(path)
                except (*DROPPED, Malformed) as exc:
                    conn.close()
                    load.error(row, f"{type(exc).__name__}: {exc}")
                    continue
                series.answered(started)
                if not 200 <= status < 300:
                    load.error(row, f"{status} {body[:200].decode(errors='replace')}")
                elif not json_object(body):
                    load.error(row, f"not a JSON object: {body[:80]!r}")
            await asyncio.sleep(max(0.0, min(think_s, until - time.perf_counter())))
    finally:
        conn.close()


async def read_events(conn: Connection, headers: dict[bytes, bytes], stream: Stream) -> bool:
    """Read SSE frames until the stream closes; True if it ended with an `end` event."""
    buffer = b""
    last_piece = time.perf_counter()
    async for piece in conn.body_pieces(headers):
        now = time.perf_counter()
        stream.longest_gap_s = max(stream.longest_gap_s, now - last_piece)
        last_piece = now
        buffer += piece.replace(b"\r\n", b"\n")
        *frames, buffer = buffer.split(b"\n\n")
        for frame in frames:
            lines = [line for line in frame.split(b"\n") if line and not line.startswith(b":")]
            if not lines:
                continue  # a keepalive comment
            kind, has_data = b"message", False
            for line in lines:
                name, _, value = line.partition(b":")
                value = value[1:] if value.startswith(b" ") else value
                if name == b"id":
                    if not value.isdigit():
                        raise Malformed(f"event id {value[:40]!r}")
                    stream.last_id = value.decode()
                elif name == b"event":
                    kind = value
                elif name == b"data":
                    if not json_object(value):
                        raise Malformed(f"event data {value[:80]!r}")
                    has_data = True
            if not has_data:
                raise Malformed(f"a frame without data: {frame[:80]!r}")
            stream.events += 1
            stream.metrics_events += kind == b"metrics"
            if kind == b"end":
                stream.ends += 1
                return True
    if buffer.strip():
        raise Malformed(f"the stream closed inside a frame: {buffer[:80]!r}")
    return False


async def follow(
    port: int, token: str, job_id: str, until: float, offset: float, load: Load
) -> None:
    """A browser's EventSource on the job until `until`, reopened with Last-Event-ID."""
    stream = Stream()
    load.streams.append(stream)
    series = load.series[SSE]
    await asyncio.sleep(offset)
    while time.perf_counter() < until:
        conn = Connection(port, token)
        resume = f"Last-Event-ID: {stream.last_id}\r\n" if stream.last_id else ""
        request = conn.request(
            f"{API}/jobs/{job_id}/events", f"Accept: text/event-stream\r\n{resume}"
        )
        answered = False
        try:
            started = time.perf_counter()
            status, headers = await asyncio.wait_for(
                conn.send(request), until - time.perf_counter()
            )
            series.answered(started)
            series.requests += 1
            stream.connects += 1
            answered = True
            if not 200 <= status < 300:
                body = await asyncio.wait_for(conn.body(headers), until - time.perf_counter())
                load.error(SSE, f"{status} {body[:200].decode(errors='replace')}")
            elif not headers.get(b"content-type", b"").startswith(b"text/event-stream"):
                load.error(SSE, f"content-type {headers.get(b'content-type')!r}")
            else:
                ended = await asyncio.wait_for(
                    read_events(conn, headers, stream), until - time.perf_counter()
                )
                if not ended:
                    load.error(SSE, "the stream closed without an `end` event")
        except asyncio.TimeoutError:
            return  # the window is over: the stream was open (or opening) until its end
        except (*DROPPED, Malformed) as exc:
            series.requests += not answered  # refused, or no headers: a failed request
            what = "stream dropped" if answered else "connect failed"
            load.error(SSE, f"{what}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()
        await asyncio.sleep(max(0.0, min(RETRY_S, until - time.perf_counter())))


async def run_load(
    port: int,
    token: str,
    job_ids: list[str],
    pollers: int,
    streamers: int,
    think_s: float,
    seconds: float,
) -> Load:
    rows = [*POLLS, SSE] if streamers else list(POLLS)
    load = Load({row: Series() for row in rows})
    load.started = started = time.perf_counter()
    until = started + seconds
    tasks = [
        poll(port, token, job_ids[n % len(job_ids)], until, think_s * n / pollers, think_s, load)
        for n in range(pollers)
    ]
    tasks += [
        follow(port, token, job_ids[n % len(job_ids)], until, think_s * n / streamers, load)
        for n in range(streamers)
    ]
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, BaseException):
            load.errors += 1
            load.first_errors.append(f"a client failed: {outcome!r}")
    load.seconds = time.perf_counter() - started
    return load


# ------------------------------------------------------------------ the service


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_for_status(
    user: httpx.Client,
    job_ids: list[str],
    wanted: set[str],
    timeout_s: float,
    *,
    training: bool = False,
) -> list[dict[str, Any]]:
    """GET each job until all are in one of `wanted` (and, with `training`, have reported
    a step: the child has started and metrics flow); raises if one fails or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = [expect(user.get(f"/jobs/{job_id}"), 200) for job_id in job_ids]
        if all(job["status"] in wanted and (step_of(job) or not training) for job in jobs):
            return jobs
        for job in jobs:
            if job["status"] == "failed":
                raise RuntimeError(f"job {job['id']} failed: {job['error']}")
        if time.monotonic() > deadline:
            shown = ", ".join(f"{job['id']} {job['status']}" for job in jobs)
            raise RuntimeError(f"jobs not {'/'.join(sorted(wanted))} in {timeout_s:g} s: {shown}")
        time.sleep(0.5)


def step_of(job: dict[str, Any]) -> int:
    progress = job.get("progress") or {}
    return int(progress.get("epoch") or 0) * int(progress.get("steps_per_epoch") or 0) + int(
        progress.get("step") or 0
    )


@dataclass
class Ours:
    load: Load
    alone: Load
    job_before: list[dict[str, Any]]
    job_after: list[dict[str, Any]]
    job_body: bytes
    metrics_body: bytes
    api_cpu_s: float
    client_cpu_s: float


def run_ours(args: argparse.Namespace, tmp: Path) -> Ours:
    worker_env = {}
    if args.threads:
        worker_env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with database("postgres", tmp) as db_url:
        settings = Settings(tmp / "home", db_url, REDIS_URL)
        migrate(db_url)
        with (
            Served("torchyard", processes=args.processes, env=settings.env()) as served,
            Worker(settings, served.url, name="w0", extra_env=worker_env) as w0,
            Worker(settings, served.url, name="w1", extra_env=worker_env) as w1,
            client(served.url, settings.token) as user,
        ):
            dataset_id = upload_dataset(user, npz_bytes(rows=args.rows))
            spec = job_spec(
                dataset_id,
                args.epochs,
                batch_size=args.batch_size,
                log_every_n_steps=args.log_every,
            )
            job_ids = [submit(user, spec)["id"] for _ in range(2)]
            try:
                before = wait_for_status(
                    user, job_ids, {"running"}, args.start_timeout_s, training=True
                )
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n{w0.tail()}\n{w1.tail()}") from None
            print(f"  both jobs training; load for {args.seconds:g} s", file=sys.stderr)
            api_before = sum(cpu_seconds(p.pid) for p in served.procs)
            client_before = time.process_time()
            load = asyncio.run(
                run_load(
                    served.port,
                    settings.token,
                    job_ids,
                    args.pollers,
                    args.streamers,
                    args.think_s,
                    args.seconds,
                )
            )
            client_cpu = time.process_time() - client_before
            api_cpu = sum(cpu_seconds(p.pid) for p in served.procs) - api_before
            after = [expect(user.get(f"/jobs/{job_id}"), 200) for job_id in job_ids]
            # The same polls from one client without think time, training still on:
            # what a request costs when it does not queue behind 199 others.
            alone = asyncio.run(run_load(served.port, settings.token, job_ids, 1, 0, 0.0, ALONE_S))
            job_reply = user.get(f"/jobs/{job_ids[0]}")
            metrics_reply = user.get(f"/jobs/{job_ids[0]}/metrics", params={"max_points": 200})
            expect(job_reply, 200)
            expect(metrics_reply, 200)
            # Cancel what still trains, so the workers stop at once rather than at
            # the end of a job (their shutdown waits for the task in hand).
            for job in after:
                if job["status"] in ("queued", "running"):
                    expect(user.post(f"/jobs/{job['id']}/cancel"), 202)
            try:
                wait_for_status(user, job_ids, {"succeeded", "failed", "cancelled"}, 60)
            except RuntimeError as exc:
                print(f"  (stopping anyway: {exc})", file=sys.stderr)
            for job in after:
                if job["status"] == "failed":
                    print(f"  worker logs:\n{w0.tail()}\n{w1.tail()}", file=sys.stderr)
    return Ours(
        load, alone, before, after, job_reply.content, metrics_reply.content, api_cpu, client_cpu
    )


def run_floor(args: argparse.Namespace, tmp: Path, ours: Ours) -> tuple[Load, int, int]:
    """The same pollers against the framework floor; its load and its two body sizes."""
    job_file, metrics_file = tmp / "job.json", tmp / "metrics.json"
    job_file.write_text(json.dumps(json.loads(ours.job_body)))
    metrics_file.write_text(json.dumps(json.loads(ours.metrics_body)))
    job_id = ours.job_after[0]["id"]
    with Served(
        "floor", processes=args.processes, floor_body=job_file, floor_metrics_body=metrics_file
    ) as floor:
        with client(floor.url) as bare:
            job_size = len(bare.get(f"/jobs/{job_id}").content)
            metrics_size = len(bare.get(f"/jobs/{job_id}/metrics").content)
        load = asyncio.run(
            run_load(
                floor.port, "-", [job_id], args.pollers, 0, args.think_s, args.baseline_seconds
            )
        )
    return load, job_size, metrics_size


# ------------------------------------------------------------------ reporting


def rows_of(name: str, load: Load) -> list[list[Any]]:
    rows = []
    for row, series in load.series.items():
        rows.append(
            [
                f"{name} {row}",
                series.requests,
                series.errors,
                series.requests / load.seconds,
                percentile(series.latencies, 50) * 1000,
                percentile(series.latencies, 99) * 1000,
                max(series.latencies, default=float("nan")) * 1000,
            ]
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="the load window")
    parser.add_argument("--pollers", type=int, default=100)
    parser.add_argument("--streamers", type=int, default=100)
    parser.add_argument("--think-s", type=float, default=0.5, help="a poller's pause a cycle")
    parser.add_argument("--baseline-seconds", type=float, default=20.0)
    parser.add_argument("--processes", type=int, default=2, help="uvicorn processes of each app")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: its default)")
    parser.add_argument("--rows", type=int, default=400_000, help="dataset rows")
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=20, help="training.log_every_n_steps")
    parser.add_argument("--start-timeout-s", type=float, default=180)
    args = parser.parse_args()

    load_before = loadavg()
    with scratch() as tmp:
        ours = run_ours(args, Path(tmp))
        load_after = loadavg()
        floor, floor_job_size, floor_metrics_size = run_floor(args, Path(tmp), ours)

    load = ours.load
    print(
        f"{args.pollers} pollers (GET job + GET metrics?max_points=200, think {args.think_s:g} s) "
        f"+ {args.streamers} SSE streamers for {load.seconds:.1f} s while 2 jobs train; "
        f"API {args.processes} uvicorn process(es), Postgres, Redis; torch threads "
        f"{args.threads or 'default'}; floor: the pollers alone for {floor.seconds:.1f} s, "
        f"no training"
    )
    print(
        f"bodies: GET job {len(ours.job_body):,} B (floor {floor_job_size:,} B), "
        f"GET metrics {len(ours.metrics_body):,} B (floor {floor_metrics_size:,} B)"
    )
    print(f"loadavg {load_before} -> {load_after} (window end)")
    print_table(
        ["", "requests", "errors", "req/s", "p50 ms", "p99 ms", "max ms"],
        rows_of("torchyard", load) + rows_of("floor", floor),
    )
    events = [s.events for s in load.streams]
    gaps = [s.longest_gap_s for s in load.streams]
    print(
        f"events received: {sum(events):,} ({sum(events) / load.seconds:,.0f}/s; "
        f"{sum(s.metrics_events for s in load.streams):,} metrics), per streamer "
        f"min {min(events, default=0):,} / median {statistics.median(events or [0]):,.0f} / "
        f"max {max(events, default=0):,}; connects {sum(s.connects for s in load.streams):,}, "
        f"`end`s {sum(s.ends for s in load.streams)}; longest wait between two pieces of a "
        f"stream: median {statistics.median(gaps or [0]):.2f} s, max {max(gaps, default=0):.2f} s"
    )
    for row in POLLS:
        slices = load.series[row].by_slice(load.started, args.seconds, SLICE_S)
        shown = ", ".join(
            f"{percentile(lat, 50) * 1000:.0f} / {percentile(lat, 99) * 1000:.0f}" for lat in slices
        )
        alone = ours.alone.series[row].latencies
        print(
            f"{row} p50 / p99 ms by {SLICE_S:g} s of the window: {shown}; one client alone "
            f"after it (training on, {len(alone)} requests): "
            f"{percentile(alone, 50) * 1000:.1f} / {percentile(alone, 99) * 1000:.1f}"
        )
    print(
        f"CPU during the window: API processes {ours.api_cpu_s:.1f} s, this load client "
        f"{ours.client_cpu_s:.1f} s (of {load.seconds:.0f} s x 2 cores)"
    )
    for before, after in zip(ours.job_before, ours.job_after, strict=True):
        note = ""
        if after["status"] == "succeeded":
            note = " - it finished inside the window: part of the load ran without it training"
        print(
            f"job {after['id']}: {after['status']} after the window (step {step_of(before):,} "
            f"-> {step_of(after):,}, epoch {(after.get('progress') or {}).get('epoch')}){note}"
        )
    print("goal: no errors; report p50/p99")

    failed = [job for job in ours.job_after if job["status"] not in ("running", "succeeded")]
    errors = (
        load.first_errors
        + [f"alone {e}" for e in ours.alone.first_errors]
        + [f"floor {e}" for e in floor.first_errors]
    )
    total = load.errors + ours.alone.errors + floor.errors + len(failed)
    if total:
        print(f"\n!!! {total} ERRORS UNDER LOAD; first ones:", file=sys.stderr)
        for job in failed:
            print(f"!!!   job {job['id']} {job['status']}: {job.get('error')}", file=sys.stderr)
        for error in errors:
            print(f"!!!   {error}", file=sys.stderr)
    else:
        print("no errors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
