"""Probes and Prometheus metrics; the API answers 503 while its database is down, then recovers."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from tests.app.conftest import Server, job_spec, server_settings, submit


def test_healthz_and_readyz(server):
    with httpx.Client(base_url=server.url) as client:
        for prefix in ("", "/api/v1"):
            assert client.get(f"{prefix}/healthz").json() == {"status": "ok"}
            ready = client.get(f"{prefix}/readyz")
            assert ready.status_code == 200
            assert ready.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_readyz_is_503_when_the_broker_is_unreachable(make_server):
    srv = make_server(broker_url="redis://127.0.0.1:1/0")
    with httpx.Client(base_url=srv.url) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["database"] == "ok"
    assert ready.json()["broker"].startswith("unreachable")


def test_a_failed_send_does_not_fail_the_submit(make_server):
    srv = make_server(broker_url="redis://127.0.0.1:1/0")
    with srv.new_user() as user:
        from tests.app.conftest import upload

        dataset = upload(user)
        job = submit(user, job_spec(dataset["id"]))
        assert user.get(f"/jobs/{job['id']}").json()["status"] == "queued"


def test_prometheus_metrics_count_jobs_and_time_requests(server, user, queued_job):
    user.get("/jobs")
    with httpx.Client(base_url=server.url) as client:
        text = client.get("/metrics").text
    assert 'torchyard_jobs{status="queued"}' in text
    assert 'torchyard_queue_depth{queue="cpu"}' in text
    assert "torchyard_http_request_duration_seconds_bucket" in text
    assert 'route="/api/v1/jobs"' in text
    queued = next(
        line for line in text.splitlines() if line.startswith('torchyard_jobs{status="queued"}')
    )
    assert float(queued.split()[-1]) >= 1


def test_openapi_docs_are_served(server):
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/jobs/{job_id}/events" in paths
    assert "/api/v1/worker/jobs/{job_id}/claim" in paths


def test_the_api_answers_503_while_postgres_is_down_and_recovers(postgres, tmp_path):
    name = f"torchyard_down_{secrets.token_hex(4)}"
    url = postgres.create(name)
    srv = Server(server_settings(tmp_path, url))
    try:
        with srv.new_user() as user:
            assert user.get("/datasets").status_code == 200
            # take the database away from under the running API
            postgres.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            postgres.execute(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            )
            for _ in range(3):
                down = user.get("/datasets")
                assert down.status_code == 503, down.text
                assert down.headers["retry-after"]
                assert "database" in down.json()["detail"]
            with httpx.Client(base_url=srv.url) as probe:
                assert probe.get("/readyz").status_code == 503
                assert probe.get("/healthz").status_code == 200

            postgres.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            deadline = time.monotonic() + 10
            while user.get("/datasets").status_code != 200:
                assert time.monotonic() < deadline, "the API did not recover"
                time.sleep(0.1)
    finally:
        srv.stop()
        postgres.drop(name)


@pytest.mark.parametrize("path", ["/jobs/validate", "/datasets"])
def test_request_validation_errors_are_422_with_paths(user, path):
    if path == "/datasets":
        response = user.post(path, data={"nothing": "here"})
    else:
        response = user.get("/jobs", params={"limit": 0})
    assert response.status_code == 422
    issue = response.json()["detail"][0]
    assert set(issue) == {"path", "message"}
    assert issue["path"] in ("body.file", "query.limit")
