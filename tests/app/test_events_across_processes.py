"""SSE across API processes: a watcher on one API instance sees reports that reached another.

The two instances share only the database (as replicas or `uvicorn --workers N` do):
separate apps, engines, artifact folders and event pollers.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.app.conftest import claim, points
from tests.app.test_events import read_events


def test_a_watcher_on_one_instance_sees_reports_sent_to_another(make_server, user, queued_job):
    other = make_server()  # same database, its own app and event poller
    seen: list[dict[str, Any]] = []
    # the watcher reads from `server`; the worker talks to `other` only
    watcher = threading.Thread(
        target=read_events, args=(user, queued_job["id"]), kwargs={"into": seen}
    )
    watcher.start()
    attempt = claim(other, queued_job["id"])
    deadline = time.monotonic() + 10
    while not any(e["data"].get("status") == "running" for e in seen):
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
    attempt.post("metrics", {"points": points(2.0, 1.0)})
    attempt.post("finish", {"status": "succeeded", "result": {}})
    watcher.join(15)
    assert not watcher.is_alive()
    kinds = [e["event"] for e in seen]
    assert kinds == ["status", "status", "metrics", "status", "end"]
    assert [p["value"] for p in seen[2]["data"]["points"]] == [2.0, 1.0]
