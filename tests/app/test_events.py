"""Server-sent events: every report becomes an event; Last-Event-ID resumes; `end` closes."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.app.conftest import claim, points


def read_events(
    client: httpx.Client, job_id: str, last_id: str | None = None, into: list | None = None
) -> list[dict[str, Any]]:
    """The whole stream, until the server closes it (appended to `into` as it arrives)."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    events: list[dict[str, Any]] = [] if into is None else into
    current: dict[str, Any] = {}
    with client.stream("GET", f"/jobs/{job_id}/events", headers=headers, timeout=20) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return events


def run_to_the_end(server, job_id: str) -> None:
    attempt = claim(server, job_id)
    attempt.post("metrics", {"points": points(1.0, 0.5)})
    attempt.post("logs", {"lines": ["epoch 1 done"]})
    weights = b"w" * 100
    headers = {"X-Sha256": hashlib.sha256(weights).hexdigest(), "X-Step": "2"}
    attempt.client.put(
        f"/worker/jobs/{job_id}/checkpoints/best/0", content=weights, headers=headers
    )
    attempt.post("finish", {"status": "succeeded", "result": {"best_epoch": 0}})


def test_a_finished_job_streams_every_report_then_end(server, user, queued_job):
    run_to_the_end(server, queued_job["id"])
    events = read_events(user, queued_job["id"])
    assert [e["event"] for e in events] == [
        "status",
        "status",
        "metrics",
        "log",
        "checkpoint",
        "status",
        "end",
    ]
    assert [e["data"].get("status") for e in events if e["event"] == "status"] == [
        "queued",
        "running",
        "succeeded",
    ]
    assert [p["value"] for p in events[2]["data"]["points"]] == [1.0, 0.5]
    assert events[3]["data"] == {"lines": ["epoch 1 done"]}
    assert events[4]["data"]["kind"] == "best"
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)


def test_last_event_id_resumes_after_that_event(server, user, queued_job):
    run_to_the_end(server, queued_job["id"])
    events = read_events(user, queued_job["id"])
    rest = read_events(user, queued_job["id"], last_id=events[3]["id"])
    assert rest == events[4:]
    # resuming past `end` still ends the stream at once
    assert [e["event"] for e in read_events(user, queued_job["id"], last_id=events[-1]["id"])] == [
        "end"
    ]


def test_a_live_watcher_sees_reports_as_they_arrive(server, user, queued_job):
    seen: list[dict[str, Any]] = []
    watcher = threading.Thread(
        target=read_events, args=(user, queued_job["id"]), kwargs={"into": seen}
    )
    watcher.start()
    attempt = claim(server, queued_job["id"])
    deadline = time.monotonic() + 10
    while (
        not any(e["data"].get("status") == "running" for e in seen) and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    attempt.post("metrics", {"points": points(3.0)})
    attempt.post("finish", {"status": "failed", "result": {"error": "out of memory"}})
    watcher.join(10)
    assert not watcher.is_alive()
    kinds = [e["event"] for e in seen]
    assert kinds[-1] == "end" and "metrics" in kinds
    failed = seen[-2]["data"]
    # a status event carries when it happened (the row's time, UTC)
    at = datetime.fromisoformat(failed.pop("at"))
    assert at.tzinfo is not None and abs(datetime.now(UTC) - at) < timedelta(minutes=1)
    assert failed == {"status": "failed", "error": "out of memory"}


def test_cancel_of_a_queued_job_ends_the_stream(server, user, queued_job):
    user.post(f"/jobs/{queued_job['id']}/cancel")
    events = read_events(user, queued_job["id"])
    assert [e["event"] for e in events] == ["status", "status", "end"]
    assert events[-1]["data"] == {"status": "cancelled"}


def test_another_users_events_are_404(server, queued_job):
    with server.new_user() as other:
        assert other.get(f"/jobs/{queued_job['id']}/events").status_code == 404


def test_the_server_stops_polling_when_the_client_goes_away(server, user, queued_job, monkeypatch):
    import app.event_stream as stream

    polls: list[str] = []
    real_poll = stream._poll_many

    def counting_poll(sessions, keys):
        polls.extend(job_id for job_id, _, _ in keys)
        return real_poll(sessions, keys)

    monkeypatch.setattr(stream, "_poll_many", counting_poll)
    with user.stream("GET", f"/jobs/{queued_job['id']}/events") as response:
        lines = response.iter_lines()
        assert next(lines).startswith("id: ")
    time.sleep(0.6)  # a poll every 0.25 s while someone listens
    after_close = polls.count(queued_job["id"])
    time.sleep(0.6)
    assert polls.count(queued_job["id"]) == after_close


def test_watchers_of_a_job_share_one_poll_a_tick_and_each_gets_every_event(
    server, user, queued_job, monkeypatch
):
    import app.event_stream as stream

    calls: list[list[tuple[str, int]]] = []
    real_poll = stream._poll_many

    def counting_poll(sessions, keys):
        calls.append(list(keys))
        return real_poll(sessions, keys)

    monkeypatch.setattr(stream, "_poll_many", counting_poll)
    watchers = 12
    seen: list[list[dict[str, Any]]] = [[] for _ in range(watchers)]
    clients = [httpx.Client(base_url=user.base_url, headers=user.headers) for _ in seen]
    threads = [
        threading.Thread(target=read_events, args=(c, queued_job["id"]), kwargs={"into": got})
        for c, got in zip(clients, seen, strict=True)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while not all(seen) and time.monotonic() < deadline:  # all attached and caught up
        time.sleep(0.05)
    assert all(seen)
    time.sleep(0.5)
    calls.clear()
    started = time.monotonic()
    time.sleep(1.0)
    measured = list(calls)
    ticks = (time.monotonic() - started) / 0.25  # a loaded machine may oversleep
    # about one poll a tick (every 0.25 s) for the twelve, each at the same cursor: one
    # key. A tick's poll may be split in two when a watcher wakes late (seen: 7 in 4
    # ticks); without the shared poll the twelve would make 12 a tick.
    assert 2 <= len(measured) <= 2 * ticks + 2, (len(measured), ticks)
    assert all(keys == [(queued_job["id"], keys[0][1], 0)] for keys in measured), measured
    run_to_the_end(server, queued_job["id"])
    for thread in threads:
        thread.join(timeout=20)
    for c in clients:
        c.close()
    kinds = [[e["event"] for e in got] for got in seen]
    assert all(k == kinds[0] for k in kinds) and kinds[0][-1] == "end"
    assert "metrics" in kinds[0]
