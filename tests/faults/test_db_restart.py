"""The database crashes and restarts under a running API (a private Postgres cluster,
stopped with `pg_ctl -m immediate`: no shutdown checkpoint, every connection cut).
"""

from __future__ import annotations

import httpx

from tests.faults.conftest import spec_for
from tests.test_service_e2e import upload_digits, wait_for


def test_requests_fail_503_while_the_database_is_down_and_work_again_after(
    private_postgres, private_redis, make_stack, examples_dir
):
    stack = make_stack(private_postgres.url, private_redis.url)
    stack.start_api()
    api_pid = stack.api.pid
    client = stack.client()
    train_id, val_id = upload_digits(client, examples_dir)
    spec = spec_for(train_id, val_id, epochs=1)
    job = client.submit(spec).info
    # GET /jobs/{id} reads on the event loop's own connections (app.async_reads): one
    # is pooled now, and the crash must turn it into a 503, then a fresh connection
    assert stack.get(f"/jobs/{job['id']}").status_code == 200

    private_postgres.crash()
    headers = {"Authorization": f"Bearer {stack.token}"}
    down = [
        stack.get("/jobs"),
        stack.get(f"/jobs/{job['id']}"),
        httpx.post(f"{stack.url}/api/v1/jobs", json=spec, headers=headers, timeout=30),
    ]
    for response in down:
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"]
        assert response.json() == {"detail": "database unavailable, retry later"}
    assert httpx.get(f"{stack.url}/readyz", timeout=10).status_code == 503

    private_postgres.start()
    wait_for(lambda: stack.get("/jobs").status_code == 200, timeout=60)
    assert stack.api.poll() is None and stack.api.pid == api_pid  # the same API process
    assert client.job(job["id"]).status == "queued"  # what was committed is still there
    assert client.submit(spec).status == "queued"  # and writes work again
    assert httpx.get(f"{stack.url}/readyz", timeout=10).status_code == 200
