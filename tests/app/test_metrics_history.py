"""Metric history: names, since_step, and downsampling that keeps first, last, min and max."""

from __future__ import annotations

import math
import random
import secrets
from typing import Any

from alembic import command
from sqlalchemy import MetaData, Table, insert, select

from app.db import make_engine, make_sessions, session_scope
from app.migrate import alembic_config, upgrade
from app.models import MetricRollup, utcnow
from app.store import jobs, metric_rollups, metrics
from tests.app.conftest import claim, points


def test_history_filters_by_name_and_step(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    attempt.post("metrics", {"points": points(*range(10)) + points(*range(10), name="val_loss")})
    url = f"/jobs/{queued_job['id']}/metrics"
    assert set(user.get(url).json()) == {"loss", "val_loss"}
    only = user.get(url, params={"names": "val_loss", "since_step": 6}).json()
    assert list(only) == ["val_loss"]
    assert [p["step"] for p in only["val_loss"]] == [7, 8, 9]
    assert set(only["val_loss"][0]) == {"step", "epoch", "value", "time"}


def expected(
    series: list[dict[str, Any]],
    max_points: int,
    since_step: int | None = None,
    until_step: int | None = None,
) -> list[dict[str, Any]]:
    """The downsampling contract, by brute force: buckets of 2**k aligned steps, the
    smallest k giving at most max_points // 4 of them over the series' steps in the
    range; each keeps its first, last, lowest and highest point (nulls last, ties:
    earliest)."""
    kept = [
        p
        for p in series
        if (since_step is None or p["step"] > since_step)
        and (until_step is None or p["step"] <= until_step)
    ]
    if len(kept) <= max_points:
        return kept
    lo, hi, k = kept[0]["step"], kept[-1]["step"], 0
    while (hi >> k) - (lo >> k) + 1 > max_points // 4:
        k += 1
    buckets: dict[int, list[dict[str, Any]]] = {}
    for p in kept:
        buckets.setdefault(p["step"] >> k, []).append(p)
    out = []
    for chunk in buckets.values():
        known = [p for p in chunk if p["value"] is not None] or chunk
        lowest = min(known, key=lambda p: (p["value"] or 0.0, p["step"]))
        highest = min(known, key=lambda p: (-(p["value"] or 0.0), p["step"]))
        picks = {p["step"]: p for p in (chunk[0], chunk[-1], lowest, highest)}
        out += sorted(picks.values(), key=lambda p: p["step"])
    return out


def stored(values: list[float | None], start: int = 0) -> list[dict[str, Any]]:
    """The points as the API answers them (NaN comes back as null)."""
    return [
        {
            "step": start + i,
            "epoch": 0,
            "value": None if v is None or not math.isfinite(v) else v,
            "time": 1_700_000_000.0 + start + i,
        }
        for i, v in enumerate(values)
    ]


def test_downsampling_keeps_the_ends_and_the_extremes_of_each_bucket(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    n = 1000
    values = [math.sin(i / 40) for i in range(n)]
    values[517] = 50.0  # a spike that must survive
    values[733] = -50.0
    for start in range(0, n, 250):
        attempt.post("metrics", {"points": points(*values[start : start + 250], start=start)})

    url = f"/jobs/{queued_job['id']}/metrics"
    full = user.get(url).json()["loss"]
    assert len(full) == n
    sampled = user.get(url, params={"max_points": 40}).json()["loss"]
    assert 4 < len(sampled) <= 40
    steps = [p["step"] for p in sampled]
    assert steps == sorted(steps)
    assert steps[0] == 0 and steps[-1] == n - 1
    assert 517 in steps and 733 in steps
    assert max(p["value"] for p in sampled) == 50.0
    assert min(p["value"] for p in sampled) == -50.0
    # 40 points are 10 buckets: the aligned buckets of 128 steps (8 of them) each
    # keep their first, last, lowest and highest point
    for bucket in range(8):
        chunk = full[bucket * 128 : (bucket + 1) * 128]
        kept = {p["step"] for p in sampled if bucket * 128 <= p["step"] < (bucket + 1) * 128}
        lowest = min(chunk, key=lambda p: p["value"])["step"]
        highest = max(chunk, key=lambda p: p["value"])["step"]
        assert {chunk[0]["step"], chunk[-1]["step"], lowest, highest} == kept
    assert sampled == expected(full, 40)

    # a series already short enough comes back whole
    assert len(user.get(url, params={"max_points": 5000}).json()["loss"]) == n
    assert user.get(url, params={"max_points": 2}).status_code == 422


def test_downsampling_is_the_same_for_any_batching_and_retried_batches(server, user, dataset):
    """Rollups are kept on ingest: batches in any order, retried or overlapping, give the
    same answer as the whole series at once, and as the contract computed by brute force."""
    from tests.app.conftest import job_spec, submit

    rng = random.Random(7)
    n = 6000
    values: list[float | None] = [rng.gauss(0, 1) for _ in range(n)]
    # null is how NaN and Inf are stored: never the lowest or highest of a bucket
    # that has a number
    for i in rng.sample(range(n), 60):
        values[i] = None
    values[4096:4112] = [None] * 16  # a whole bucket at the finest width
    series = stored(values)

    whole = claim(server, submit(user, job_spec(dataset["id"]))["id"])
    assert whole.post("metrics", {"points": points(*values)}).json()["inserted"] == n

    pieces = claim(server, submit(user, job_spec(dataset["id"]))["id"])
    # batches of 500..700 points every 500 steps: each overlaps the next one
    batches = [(start, rng.randint(500, 700)) for start in range(0, n, 500)]
    rng.shuffle(batches)
    inserted = 0
    for start, size in batches:
        body = {"points": points(*values[start : start + size], start=start)}
        inserted += pieces.post("metrics", body).json()["inserted"]
        assert pieces.post("metrics", body).json()["inserted"] == 0  # a retry stores nothing
    assert inserted == n

    for max_points in (4, 40, 1000, 5999, 6000):
        for since_step in (None, -1, 0, 1234, 4097, 5990):
            params: dict[str, Any] = {"max_points": max_points}
            if since_step is not None:
                params["since_step"] = since_step
            want = expected(series, max_points, since_step)
            for attempt in (whole, pieces):
                got = user.get(f"/jobs/{attempt.job_id}/metrics", params=params).json()
                assert got.get("loss", []) == want, (max_points, since_step)

    # a zoom: a step range at full resolution, downsampled within it (its edges cut
    # stored buckets, which are rebuilt from finer ones and raw points)
    ranges = [(0, 63), (100, 5000), (1234, 1300), (4097, 4200), (3000, 5999), (5990, 9000)]
    for max_points in (4, 40, 1000):
        for from_step, until_step in ranges:
            params = {"max_points": max_points, "from_step": from_step, "until_step": until_step}
            want = expected(series, max_points, from_step - 1, until_step)
            for attempt in (whole, pieces):
                got = user.get(f"/jobs/{attempt.job_id}/metrics", params=params).json()
                assert got.get("loss", []) == want, (max_points, from_step, until_step)
    # the full history of a range, streamed, is the same points
    for from_step, until_step in ranges:
        params = {"from_step": from_step, "until_step": until_step}
        want = [p for p in series if from_step <= p["step"] <= until_step]
        for attempt in (whole, pieces):
            got = user.get(f"/jobs/{attempt.job_id}/metrics", params=params).json()
            assert got.get("loss", []) == want, (from_step, until_step)


def columns(history: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[Any]]]:
    return {
        name: {key: [p[key] for p in pts] for key in ("step", "epoch", "value", "time")}
        for name, pts in history.items()
    }


def test_streamed_and_columnar_histories_equal_the_points_answer(
    server, user, queued_job, monkeypatch
):
    """A full history is streamed a page at a time (pages of 700 points here, so a series
    spans many, and late batches overlap others); the points and the columnar answers,
    streamed or downsampled, hold the same steps and values as the points answer."""
    from app.store import metric_stream

    monkeypatch.setattr(metric_stream, "PAGE_POINTS", 700)
    rng = random.Random(3)
    n = 5000
    values: list[float | None] = [rng.gauss(0, 1) for _ in range(n)]
    for i in rng.sample(range(n), 50):
        values[i] = None
    attempt = claim(server, queued_job["id"])
    batches = [(start, 400) for start in range(0, n, 400)]
    late = batches.pop(3)  # reported last: its chunk lies among the others
    for start, size in [*batches, late]:
        body = points(*values[start : start + size], start=start) + points(
            *values[start : start + size // 2], name="acc", start=2 * start
        )
        if start == 0:  # steps 100..199 come last: their chunk lies inside this one's range
            body = [p for p in body if not (p["name"] == "loss" and 100 <= p["step"] < 200)]
        attempt.post("metrics", {"points": body})
    attempt.post("metrics", {"points": points(*values[100:200], start=100)})
    # small batches appended to the last chunk, and one that overlaps stored steps
    for start in range(n, n + 50, 10):
        attempt.post("metrics", {"points": points(*[0.5] * 10, start=start)})
    attempt.post("metrics", {"points": points(*values[4990:], 1.0, start=4990)})
    want = {
        "acc": [
            p
            for start, size in [*batches, late]
            for p in stored(values[start : start + size // 2], start=2 * start)
        ],
        "loss": stored([*values, *[0.5] * 50]),
    }
    want["acc"].sort(key=lambda p: p["step"])

    url = f"/jobs/{queued_job['id']}/metrics"
    response = user.get(url)
    assert response.headers.get("transfer-encoding") == "chunked"  # streamed, no length
    assert response.json() == want
    assert user.get(url, params={"max_points": 100_000}).json() == want  # the kept path
    assert user.get(url, params={"format": "columnar"}).json() == columns(want)
    for max_points in (40, 100_000):
        params: dict[str, Any] = {"max_points": max_points}
        sampled = user.get(url, params=params).json()
        got = user.get(url, params={**params, "format": "columnar"}).json()
        assert got == columns(sampled)
    for params in ({"names": "acc"}, {"since_step": 4321}, {"from_step": 700, "until_step": 2099}):
        points_answer = user.get(url, params={**params, "max_points": 100_000}).json()
        assert user.get(url, params=params).json() == points_answer
        assert user.get(url, params={**params, "format": "columnar"}).json() == columns(
            points_answer
        )
    # a range with no point leaves the series out, as the short answer does
    assert list(user.get(url, params={"from_step": 5060}).json()) == ["acc"]
    for shape in ("points", "columnar"):
        params = {"from_step": 10_000, "format": shape}
        assert user.get(url, params=params).json() == {}
    assert user.get(url, params={"format": "table"}).status_code == 422


def test_a_full_history_is_encoded_a_page_at_a_time(server, user, queued_job, monkeypatch):
    """The streamed answer is a generator of pieces, each about a page (plus a write's
    worth of small pieces): what a read holds in memory does not grow with the series."""
    from app.store import metric_stream

    monkeypatch.setattr(metric_stream, "PAGE_POINTS", 1000)
    monkeypatch.setattr(metric_stream, "WRITE_BYTES", 1)
    attempt = claim(server, queued_job["id"])
    n = 20_000
    for start in range(0, n, 2000):
        attempt.post(
            "metrics", {"points": points(*[1.0 / (i + 1) for i in range(2000)], start=start)}
        )
    job_id = queued_job["id"]
    sessions = server.app.state.read_sessions
    with session_scope(server.sessions) as session:
        owner = jobs.owners(session, [job_id])[job_id][0]
    for columnar in (False, True):
        pieces = metric_stream.open_history(sessions, job_id, owner, columnar=columnar)
        assert pieces is not None
        sizes = [len(piece) for piece in pieces]
        assert len(sizes) >= 10
        page_bytes = 2000 * 80  # a page (a chunk of 2,000 points) of the longest encoding
        assert max(sizes) <= page_bytes, sizes
    assert metric_stream.open_history(sessions, job_id, owner + 1) is None


def test_downsampled_history_lists_every_metric_when_no_names_are_given(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    attempt.post("metrics", {"points": points(*range(300)) + points(*range(3), name="lr")})
    got = user.get(f"/jobs/{queued_job['id']}/metrics", params={"max_points": 100}).json()
    assert set(got) == {"loss", "lr"}
    assert len(got["lr"]) == 3 and 4 < len(got["loss"]) <= 100


def test_metrics_of_another_users_job_are_404(server, queued_job):
    with server.new_user() as other:
        assert other.get(f"/jobs/{queued_job['id']}/metrics").status_code == 404


def test_the_migrations_keep_points_stored_before_them(postgres, tmp_path):
    """Points stored under schema 0001 get their rollups from 0002's backfill, exactly the
    rows ingest would have kept, and 0003 moves them into chunks: every point reads back."""
    urls = {"sqlite": f"sqlite:///{tmp_path / 'old.db'}"}
    name = f"torchyard_backfill_{secrets.token_hex(4)}"
    urls["postgres"] = postgres.create(name)
    rng = random.Random(3)
    values = [
        rng.choice([rng.gauss(0, 1), None]) if i % 7 == 0 else rng.gauss(0, 1) for i in range(5000)
    ]
    try:
        for url in urls.values():
            upgrade(url, "0001")
            engine = make_engine(url)
            try:
                with session_scope(make_sessions(engine)) as session:
                    session.execute(insert(_table(session, "users")).values(_old_user()))
                    session.execute(insert(_table(session, "jobs")).values(_old_job("j1")))
                    rows = [
                        {"job_id": "j1", "name": metric, **p}
                        for metric in ("loss", "acc")
                        for p in stored(values)
                    ]
                    session.execute(insert(_table(session, "metric_points")), rows)
                upgrade(url)
                with session_scope(make_sessions(engine)) as session:
                    history = metrics.history(session, "j1")
                    assert history == {"acc": stored(values), "loss": stored(values)}
                    backfilled = _rollups(session)
                    session.execute(MetricRollup.__table__.delete())
                    metric_rollups.add(session, "j1", rows)
                    assert backfilled == _rollups(session)
                    assert len(backfilled) > 2 * 5000 // 64
                # and back: 0002's table of points, with its finest rollups rebuilt
                with engine.connect() as connection:
                    config = alembic_config()
                    config.attributes["connection"] = connection
                    command.downgrade(config, "0002")
                    connection.commit()
                with session_scope(make_sessions(engine)) as session:
                    table = _table(session, "metric_points")
                    back = session.execute(select(table).order_by(table.c.name, table.c.step))
                    assert [dict(r._mapping) for r in back] == sorted(
                        rows, key=lambda r: (r["name"], r["step"])
                    )
                    finest = _table(session, "metric_rollups")
                    level_4 = select(finest).where(finest.c.level == 4)
                    assert len(session.execute(level_4).all()) == 2 * math.ceil(5000 / 16)
            finally:
                engine.dispose()
    finally:
        postgres.drop(name)


def _table(session: Any, name: str) -> Table:
    """Schema 0001's table as the database has it, whatever the models have become since."""
    return Table(name, MetaData(), autoload_with=session.connection())


def _old_user() -> dict[str, Any]:
    return {"id": 1, "name": "old", "admin": False, "created_at": utcnow()}


def _old_job(job_id: str) -> dict[str, Any]:
    return {
        "id": job_id,
        "user_id": 1,
        "name": "old",
        "status": "succeeded",
        "spec": {},
        "fields": {},
        "queue": "cpu",
        "attempt": 1,
        "max_restarts": 0,
        "created_at": utcnow(),
        "cancel_requested": False,
        "latest_metrics": {},
        "stopped_early": False,
    }


def _rollups(session: Any) -> list[tuple[Any, ...]]:
    table = MetricRollup.__table__
    return [tuple(row) for row in session.execute(select(table).order_by(*table.primary_key))]


def test_small_batches_fill_one_chunk_per_series_and_events_keep_each_batchs_points(
    server, user, queued_job
):
    """A worker reports every second or so: its batches go into the series' last chunk
    (up to CHUNK_POINTS points) rather than a row each, and each metrics event still
    streams exactly the points of its own batch."""
    from app.models import MetricChunk
    from app.store.metrics import CHUNK_POINTS
    from tests.app.test_events import read_events

    attempt = claim(server, queued_job["id"])
    sent = []
    for batch in range(40):
        body = points(*[batch + i / 10 for i in range(3)], start=3 * batch) + points(
            batch, name="lr", start=3 * batch
        )
        assert attempt.post("metrics", {"points": body}).json()["inserted"] == 4
        sent.append(body)
    # a batch too big for the last chunk starts a new one
    big = points(*[0.5] * CHUNK_POINTS, start=120)
    assert attempt.post("metrics", {"points": big}).json()["inserted"] == CHUNK_POINTS
    attempt.post("finish", {"status": "succeeded", "result": {}})

    job_id = queued_job["id"]
    with session_scope(server.sessions) as session:
        chunks = session.execute(
            select(MetricChunk.name, MetricChunk.first_step, MetricChunk.count)
            .where(MetricChunk.job_id == job_id)
            .order_by(MetricChunk.name, MetricChunk.first_step)
        ).all()
    assert [tuple(c) for c in chunks] == [
        ("loss", 0, 120),
        ("loss", 120, CHUNK_POINTS),
        ("lr", 0, 40),
    ]

    history = user.get(f"/jobs/{job_id}/metrics").json()
    assert history["loss"] == [
        {k: p[k] for k in ("step", "epoch", "value", "time")}
        for body in [*sent, big]
        for p in body
        if p["name"] == "loss"
    ]
    streamed = [e["data"]["points"] for e in read_events(user, job_id) if e["event"] == "metrics"]
    assert streamed == [*sent, big]


def test_a_history_is_read_again_only_after_the_job_reported_and_never_stale(
    server, user, queued_job, monkeypatch
):
    """Dashboards polling between two reports share one read; a poll made after a report
    (or any event) always sees it."""
    reads: list[str] = []
    real = metrics.history

    def counting(session, job_id, **kwargs):
        reads.append(job_id)
        return real(session, job_id, **kwargs)

    monkeypatch.setattr(metrics, "history", counting)
    attempt = claim(server, queued_job["id"])
    url = f"/jobs/{queued_job['id']}/metrics"
    attempt.post("metrics", {"points": points(1.0, 2.0)})
    first = user.get(url, params={"max_points": 100}).json()
    for _ in range(5):
        assert user.get(url, params={"max_points": 100}).json() == first
    assert len(reads) == 1  # nothing reported since: the same answer, not read again
    attempt.post("metrics", {"points": points(3.0, start=2)})
    after = user.get(url, params={"max_points": 100}).json()
    assert [p["value"] for p in after["loss"]] == [1.0, 2.0, 3.0]  # read-your-writes
    assert len(reads) == 2
    attempt.post("logs", {"lines": ["any event"]})  # any report: read again (cheap, safe)
    assert user.get(url, params={"max_points": 100}).json() == after
    assert len(reads) == 3
    # another question is another answer
    assert user.get(url, params={"names": "loss", "max_points": 100}).json() == after
    assert len(reads) == 4
    # a full history is streamed from the chunks, not kept: an answer of any size
    assert user.get(url).json() == after
    assert len(reads) == 4
