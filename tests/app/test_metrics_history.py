"""Metric history: names, since_step, and downsampling that keeps first, last, min and max."""

from __future__ import annotations

import math

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
    # each of the 10 buckets of 100 steps keeps its first, last, lowest and highest point
    for bucket in range(10):
        chunk = full[bucket * 100 : (bucket + 1) * 100]
        kept = {p["step"] for p in sampled if bucket * 100 <= p["step"] < (bucket + 1) * 100}
        lowest = min(chunk, key=lambda p: p["value"])["step"]
        highest = max(chunk, key=lambda p: p["value"])["step"]
        assert {chunk[0]["step"], chunk[-1]["step"], lowest, highest} == kept

    # a series already short enough comes back whole
    assert len(user.get(url, params={"max_points": 5000}).json()["loss"]) == n
    assert user.get(url, params={"max_points": 2}).status_code == 422


def test_metrics_of_another_users_job_are_404(server, queued_job):
    with server.new_user() as other:
        assert other.get(f"/jobs/{queued_job['id']}/metrics").status_code == 404
