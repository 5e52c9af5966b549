"""Every endpoint but health needs a token; a user sees only their own things."""

from __future__ import annotations

import hashlib

from tests.app.conftest import claim


def test_requests_without_or_with_a_bad_token_are_401(server, queued_job):
    routes = [
        ("GET", "/jobs"),
        ("POST", "/jobs"),
        ("POST", "/jobs/validate"),
        ("GET", f"/jobs/{queued_job['id']}"),
        ("GET", f"/jobs/{queued_job['id']}/events"),
        ("GET", f"/jobs/{queued_job['id']}/metrics"),
        ("GET", f"/jobs/{queued_job['id']}/checkpoints/best"),
        ("GET", "/datasets"),
        ("POST", "/datasets"),
    ]
    for token in (None, "ty_not-a-real-token"):
        with server.client(token) as client:
            for method, path in routes:
                response = client.request(method, path)
                assert response.status_code == 401, (token, method, path)
                assert response.headers["www-authenticate"] == "Bearer"
                assert isinstance(response.json()["detail"], str)


def test_another_users_job_dataset_and_checkpoints_are_404(server, user, dataset, queued_job):
    attempt = claim(server, queued_job["id"])
    weights = b"weights"
    attempt.client.put(
        f"/worker/jobs/{queued_job['id']}/checkpoints/best/0",
        content=weights,
        headers={"X-Sha256": hashlib.sha256(weights).hexdigest()},
    )
    [checkpoint] = user.get(f"/jobs/{queued_job['id']}/checkpoints").json()
    job = queued_job["id"]
    with server.new_user() as other:
        for path in (
            f"/jobs/{job}",
            f"/jobs/{job}/metrics",
            f"/jobs/{job}/events",
            f"/jobs/{job}/logs",
            f"/jobs/{job}/checkpoints",
            f"/jobs/{job}/checkpoints/best",
            f"/jobs/{job}/checkpoints/{checkpoint['id']}",
            f"/datasets/{dataset['id']}",
        ):
            assert other.get(path).status_code == 404, path
        assert other.post(f"/jobs/{job}/cancel").status_code == 404
        assert other.delete(f"/datasets/{dataset['id']}").status_code == 404
        assert other.get("/jobs").json()["jobs"] == []
        assert other.get("/datasets").json() == []
    # and nothing changed for the owner
    assert user.get(f"/jobs/{job}").json()["status"] == "running"


def test_a_user_token_cannot_act_as_a_worker(server, user, queued_job):
    token = user.headers["authorization"].removeprefix("Bearer ")
    with server.client(token) as client:
        assert (
            client.post(f"/worker/jobs/{queued_job['id']}/claim", json={"worker": "x"}).status_code
            == 401
        )
        assert client.post(f"/worker/jobs/{queued_job['id']}/heartbeat", json={}).status_code == 401


def test_health_is_open(server):
    with server.client() as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
