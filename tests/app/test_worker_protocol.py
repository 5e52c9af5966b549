"""The worker protocol end to end, driven over HTTP as a worker drives it."""

from __future__ import annotations

import hashlib

from app.db import session_scope
from app.reconciler import reconcile
from tests.app.conftest import claim, points


def test_claim_starts_an_attempt_and_a_second_claim_is_409(server, user, dataset, queued_job):
    attempt = claim(server, queued_job["id"])
    body = attempt.claim
    assert body["attempt"] == 1
    assert body["lease_s"] == server.settings.lease_s
    assert body["spec"]["data"]["train"] == dataset["id"]
    assert body["resume"] is None
    ref = body["datasets"][dataset["id"]]
    assert ref["sha256"] == dataset["sha256"]
    assert ref["filename"] == "train.npz"

    with server.worker() as worker:
        again = worker.post(f"/worker/jobs/{queued_job['id']}/claim", json={"worker": "other:2"})
        assert again.status_code == 409
        assert "stale" not in again.json()["detail"]

    job = user.get(f"/jobs/{queued_job['id']}").json()
    assert job["status"] == "running" and job["started_at"] is not None

    # the attempt token downloads the job's dataset, verifiable by sha256
    file = attempt.client.get(ref["url"].removeprefix("/api/v1"))
    assert file.status_code == 200
    assert hashlib.sha256(file.content).hexdigest() == dataset["sha256"]


def test_claim_needs_the_worker_token(server, queued_job):
    with server.client("not-the-worker-token") as impostor:
        response = impostor.post(f"/worker/jobs/{queued_job['id']}/claim", json={"worker": "x:1"})
    assert response.status_code == 401
    with server.client() as anonymous:
        assert (
            anonymous.post(
                f"/worker/jobs/{queued_job['id']}/claim", json={"worker": "x"}
            ).status_code
            == 401
        )


def test_attempt_token_is_scoped_to_its_job(server, user, dataset, queued_job):
    from tests.app.conftest import job_spec, submit

    other = submit(user, job_spec(dataset["id"]))
    attempt = claim(server, queued_job["id"])
    response = attempt.client.post(f"/worker/jobs/{other['id']}/heartbeat", json={"progress": {}})
    assert response.status_code == 404
    with server.client("tya_unknown") as stranger:
        assert (
            stranger.post(f"/worker/jobs/{queued_job['id']}/heartbeat", json={}).status_code == 401
        )


def test_metrics_batch_is_idempotent_and_updates_latest(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    batch = points(2.0, 1.5, 1.0) + points(0.5, name="accuracy")
    first = attempt.post("metrics", {"points": batch})
    assert first.status_code == 200
    assert first.json() == {"inserted": 4, "cancel": False}
    again = attempt.post("metrics", {"points": batch})
    assert again.json() == {"inserted": 0, "cancel": False}

    history = user.get(f"/jobs/{queued_job['id']}/metrics").json()
    assert [p["value"] for p in history["loss"]] == [2.0, 1.5, 1.0]
    job = user.get(f"/jobs/{queued_job['id']}").json()
    assert job["metrics"] == {"accuracy": 0.5, "loss": 1.0}
    # a late retry of an older step does not move "latest" back
    attempt.post("metrics", {"points": points(9.0, start=1) + points(0.25, start=3)})
    assert user.get(f"/jobs/{queued_job['id']}").json()["metrics"]["loss"] == 0.25


def test_nan_metric_values_are_stored_as_null(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    response = attempt.client.post(
        f"/worker/jobs/{queued_job['id']}/metrics",
        content=b'{"points": [{"name": "loss", "step": 0, "epoch": 0, "value": NaN, "time": 1.0}]}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert user.get(f"/jobs/{queued_job['id']}/metrics").json()["loss"][0]["value"] is None


def test_heartbeat_extends_the_lease_and_answers_cancel_after_a_cancel_request(
    server, user, queued_job
):
    attempt = claim(server, queued_job["id"])
    progress = {"epoch": 0, "epochs": 3, "step": 10, "steps_per_epoch": 4}
    assert attempt.post("heartbeat", {"progress": progress}).json() == {"cancel": False}
    progress["step"] = 11
    assert attempt.post("heartbeat", {"progress": progress}).json() == {"cancel": False}
    job = user.get(f"/jobs/{queued_job['id']}").json()
    assert job["progress"]["step"] == 11 and job["progress"]["epochs"] == 3
    assert job["progress"]["eta_s"] is not None

    response = user.post(f"/jobs/{queued_job['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"]
    assert attempt.post("heartbeat", {"progress": progress}).json() == {"cancel": True}
    assert attempt.post("metrics", {"points": points(1.0, start=50)}).json()["cancel"] is True

    finished = attempt.post("finish", {"status": "cancelled", "result": {"status": "cancelled"}})
    assert finished.status_code == 200
    assert user.get(f"/jobs/{queued_job['id']}").json()["status"] == "cancelled"


def test_checkpoint_upload_list_download_with_etag_and_range(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    weights = bytes(range(256)) * 40
    digest = hashlib.sha256(weights).hexdigest()
    url = f"/worker/jobs/{queued_job['id']}/checkpoints/best/2"
    headers = {"X-Sha256": digest, "X-Step": "12", "X-Monitor": "val_loss", "X-Value": "0.25"}
    put = attempt.client.put(url, content=weights, headers=headers)
    assert put.status_code == 201, put.text
    assert attempt.client.put(url, content=weights, headers=headers).status_code == 201  # a retry

    [listed] = user.get(f"/jobs/{queued_job['id']}/checkpoints").json()
    assert listed["kind"] == "best" and listed["epoch"] == 2 and listed["step"] == 12
    assert listed["monitor"] == "val_loss" and listed["value"] == 0.25
    assert listed["size"] == len(weights) and listed["sha256"] == digest

    for path in ("best", str(listed["id"])):
        full = user.get(f"/jobs/{queued_job['id']}/checkpoints/{path}")
        assert full.status_code == 200
        assert hashlib.sha256(full.content).hexdigest() == digest
        assert full.headers["etag"] == f'"{digest}"'
        assert "attachment" in full.headers["content-disposition"]
        assert full.headers["content-disposition"].endswith('.safetensors"')

    base = f"/jobs/{queued_job['id']}/checkpoints/best"
    assert user.get(base, headers={"If-None-Match": f'"{digest}"'}).status_code == 304
    part = user.get(base, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == weights[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(weights)}"
    assert user.get(base, headers={"Range": f"bytes={len(weights) + 10}-"}).status_code == 416


def test_checkpoint_with_a_wrong_sha256_is_400_and_not_stored(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    url = f"/worker/jobs/{queued_job['id']}/checkpoints/last/0"
    bad = attempt.client.put(url, content=b"weights", headers={"X-Sha256": "0" * 64})
    assert bad.status_code == 400
    assert user.get(f"/jobs/{queued_job['id']}/checkpoints").json() == []
    # this job's folder only: the server is shared with other tests' jobs
    assert not list((server.settings.artifact_dir / "jobs" / queued_job["id"]).rglob("*.pt"))
    assert (
        attempt.client.put(url, content=b"weights", headers={"X-Sha256": "xyz"}).status_code == 400
    )


def test_resume_serves_the_latest_training_state(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    resume = f"/worker/jobs/{queued_job['id']}/resume"
    assert attempt.client.get(resume).status_code == 404
    for epoch, state in ((0, b"state-0"), (1, b"state-1")):
        headers = {"X-Sha256": hashlib.sha256(state).hexdigest(), "X-Step": str(epoch * 4)}
        put = attempt.client.put(
            f"/worker/jobs/{queued_job['id']}/checkpoints/last/{epoch}",
            content=state,
            headers=headers,
        )
        assert put.status_code == 201
    assert attempt.client.get(resume).content == b"state-1"


def test_logs_are_appended_and_read_back(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    assert (
        attempt.post("logs", {"lines": ["epoch 1: loss 0.5", "epoch 2: loss 0.4"]}).status_code
        == 204
    )
    assert attempt.post("logs", {"lines": ["done"]}).status_code == 204
    logs = user.get(f"/jobs/{queued_job['id']}/logs").json()
    assert logs == {"lines": ["epoch 1: loss 0.5", "epoch 2: loss 0.4", "done"]}
    assert user.get(f"/jobs/{queued_job['id']}/logs", params={"tail": 1}).json() == {
        "lines": ["done"]
    }


def test_finish_records_the_result_and_ends_the_attempt(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    result = {
        "status": "succeeded",
        "epochs_run": 3,
        "steps": 12,
        "best_epoch": 1,
        "monitor": "val_loss",
        "best_value": 0.125,
        "stopped_early": True,
        "stop_reason": "val_loss did not improve for 2 epochs",
        "error": None,
        "final_metrics": {"loss": 0.2},
        "duration_s": 1.5,
    }
    response = attempt.post("finish", {"status": "succeeded", "result": result})
    assert response.status_code == 200, response.text
    job = user.get(f"/jobs/{queued_job['id']}").json()
    assert job["status"] == "succeeded" and job["finished_at"] is not None
    assert job["best"] == {"epoch": 1, "monitor": "val_loss", "value": 0.125}
    assert job["stopped_early"] is True
    assert job["stop_reason"] == "val_loss did not improve for 2 epochs"
    assert job["error"] is None
    # the attempt is over: its token is stale now, and a terminal state never changes
    assert attempt.post("heartbeat", {"progress": {}}).status_code == 409
    assert attempt.post("finish", {"status": "failed", "result": {}}).status_code == 409
    assert user.post(f"/jobs/{queued_job['id']}/cancel").status_code == 409
    assert user.get(f"/jobs/{queued_job['id']}").json()["status"] == "succeeded"


def test_a_failed_run_keeps_its_error(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    attempt.post("finish", {"status": "failed", "result": {"error": "loss became NaN at step 7"}})
    job = user.get(f"/jobs/{queued_job['id']}").json()
    assert job["status"] == "failed" and job["error"] == "loss became NaN at step 7"


def test_stale_attempt_after_the_reconciler_requeues_an_expired_lease(make_server):
    srv = make_server(lease_s=0.2)
    from tests.app.conftest import job_spec, submit, upload

    with srv.new_user() as user:
        dataset = upload(user)
        job = submit(user, job_spec(dataset["id"]))
        first = claim(srv, job["id"])
        assert first.post("heartbeat", {"progress": {"step": 1}}).status_code == 200
        state = b"training state after epoch 0"
        headers = {"X-Sha256": hashlib.sha256(state).hexdigest(), "X-Step": "4"}
        put = first.client.put(
            f"/worker/jobs/{job['id']}/checkpoints/last/0", content=state, headers=headers
        )
        assert put.status_code == 201

        import time

        time.sleep(0.3)
        with session_scope(srv.sessions) as session:
            report = reconcile(session, srv.settings, srv.app.state.dispatcher)
        assert job["id"] in report.requeued
        requeued = user.get(f"/jobs/{job['id']}").json()
        assert requeued["status"] == "queued" and requeued["attempt"] == 2
        assert len(srv.sent_for(job["id"])) == 2  # the submit's wake-up and the requeue's

        stale = first.post("heartbeat", {"progress": {"step": 2}})
        assert stale.status_code == 409 and stale.json() == {"detail": "stale attempt"}
        assert first.post("metrics", {"points": points(1.0)}).status_code == 409

        second = claim(srv, job["id"], "host:2")
        assert second.claim["attempt"] == 2
        # the next attempt resumes from the last full checkpoint
        resume = second.claim["resume"]["url"].removeprefix("/api/v1")
        assert second.client.get(resume).content == state
        assert first.client.get(resume).status_code == 409
        assert first.post("finish", {"status": "succeeded", "result": {}}).status_code == 409
        assert second.post("finish", {"status": "succeeded", "result": {}}).status_code == 200


def test_a_job_lost_past_max_restarts_fails_with_worker_lost(make_server):
    srv = make_server(lease_s=0.1)
    from tests.app.conftest import job_spec, submit, upload

    with srv.new_user() as user:
        dataset = upload(user)
        job = submit(user, job_spec(dataset["id"], max_restarts=1))
        import time

        for _ in range(2):
            claim(srv, job["id"])
            time.sleep(0.15)
            with session_scope(srv.sessions) as session:
                reconcile(session, srv.settings, srv.app.state.dispatcher)
        final = user.get(f"/jobs/{job['id']}").json()
        assert final["status"] == "failed"
        assert final["error"].startswith("worker lost")


def test_a_bad_metrics_batch_is_a_422_naming_the_point_and_stores_nothing(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    url = f"/worker/jobs/{queued_job['id']}/metrics"
    bad = points(1.0, 2.0)
    bad[1]["step"] = -1
    response = attempt.post("metrics", {"points": bad})
    assert response.status_code == 422
    assert response.json()["detail"][0]["path"] == "body.points[1].step"
    del bad[1]["step"]
    assert attempt.post("metrics", {"points": bad}).json()["detail"][0]["path"] == (
        "body.points[1].step"
    )
    for body in (b"{not json", b"", b'{"points": 3}'):
        response = attempt.client.post(
            url, content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, body
        assert response.json()["detail"][0]["path"].startswith("body"), response.json()
    # NaN and Inf, as Python's json writes them, are accepted and stored as null
    nan = b'{"points": [{"name": "loss", "step": 1, "epoch": 0, "value": NaN, "time": 1.0}]}'
    response = attempt.client.post(url, content=nan, headers={"Content-Type": "application/json"})
    assert response.json()["inserted"] == 1
    history = user.get(f"/jobs/{queued_job['id']}/metrics").json()
    assert history == {"loss": [{"step": 1, "epoch": 0, "value": None, "time": 1.0}]}
