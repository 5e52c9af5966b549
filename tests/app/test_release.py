"""A stopping worker hands its job back: release, driven over HTTP as a worker drives it."""

from __future__ import annotations

import hashlib
import time

from sqlalchemy import select

from app.db import session_scope
from app.models import Attempt, JobEvent
from app.reconciler import reconcile
from tests.app.conftest import claim, job_spec, submit, upload


def test_a_released_job_is_queued_at_once_woken_and_resumed_by_the_next_attempt(make_server):
    # a server of its own: the checkpoint stored here must not show in the shared one's files
    server = make_server()
    with server.new_user() as user:
        released_job_resumes(server, user, submit(user, job_spec(upload(user)["id"]))["id"])


def released_job_resumes(server, user, job_id: str) -> None:
    first = claim(server, job_id)
    state = b"mid-epoch training state"
    headers = {"X-Sha256": hashlib.sha256(state).hexdigest(), "X-Step": "6"}
    put = first.client.put(
        f"/worker/jobs/{job_id}/checkpoints/last/1", content=state, headers=headers
    )
    assert put.status_code == 201
    sent_before = len(server.sent_for(job_id))

    response = first.post("release", {"reason": "worker stopping (SIGTERM)"})
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["attempt"]) == ("queued", 2)
    assert user.get(f"/jobs/{job_id}").json()["status"] == "queued"
    # woken at once: the job does not wait for the reconciler's re-send
    assert len(server.sent_for(job_id)) == sent_before + 1

    # a retried release (its answer was lost) changes nothing and sends nothing
    again = first.post("release", {})
    assert again.status_code == 200 and again.json()["attempt"] == 2
    assert len(server.sent_for(job_id)) == sent_before + 1
    # for everything else the released attempt is over
    assert first.post("heartbeat", {"progress": {}}).status_code == 409

    second = claim(server, job_id, "host:2")
    assert second.claim["attempt"] == 2
    assert second.client.get(second.claim["resume"]["url"].removeprefix("/api/v1")).content == state
    # a late retry of the old release while attempt 2 runs still moves nothing
    assert first.post("release", {}).status_code == 200
    assert user.get(f"/jobs/{job_id}").json()["status"] == "running"
    with session_scope(server.sessions) as session:
        outcomes = session.execute(
            select(Attempt.n, Attempt.outcome).where(Attempt.job_id == job_id).order_by(Attempt.n)
        ).all()
        statuses = session.execute(
            select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.kind == "status")
        ).scalars()
        assert {"status": "queued", "attempt": 2, "reason": "worker stopping (SIGTERM)"} in list(
            statuses
        )
    assert [tuple(row) for row in outcomes] == [(1, "released"), (2, None)]


def test_only_the_current_attempt_may_release(make_server):
    srv = make_server(lease_s=0.2)
    with srv.new_user() as user:
        job = submit(user, job_spec(upload(user)["id"]))
        first = claim(srv, job["id"])
        time.sleep(0.3)
        with session_scope(srv.sessions) as session:
            reconcile(session, srv.settings, srv.app.state.dispatcher)
        second = claim(srv, job["id"], "host:2")
        stale = first.post("release", {})
        assert stale.status_code == 409 and stale.json() == {"detail": "stale attempt"}
        assert user.get(f"/jobs/{job['id']}").json()["attempt"] == 2
        with srv.client("tya_unknown") as stranger:
            assert stranger.post(f"/worker/jobs/{job['id']}/release", json={}).status_code == 401
        other = submit(user, job_spec(upload(user)["id"]))
        assert second.client.post(f"/worker/jobs/{other['id']}/release", json={}).status_code == 404


def test_releases_use_none_of_max_restarts(make_server):
    """With max_restarts 1, a job released twice still survives one lost worker."""
    srv = make_server(lease_s=0.1)
    with srv.new_user() as user:
        job = submit(user, job_spec(upload(user)["id"], max_restarts=1))
        for _ in range(2):
            assert claim(srv, job["id"]).post("release", {}).status_code == 200
        claim(srv, job["id"])  # attempt 3, whose worker is lost
        time.sleep(0.15)
        with session_scope(srv.sessions) as session:
            reconcile(session, srv.settings, srv.app.state.dispatcher)
        lost_once = user.get(f"/jobs/{job['id']}").json()
        assert (lost_once["status"], lost_once["attempt"]) == ("queued", 4)
        claim(srv, job["id"])  # attempt 4, lost too: the one restart is used up
        time.sleep(0.15)
        with session_scope(srv.sessions) as session:
            reconcile(session, srv.settings, srv.app.state.dispatcher)
        final = user.get(f"/jobs/{job['id']}").json()
        assert final["status"] == "failed"
        assert final["error"] == "worker lost: no heartbeat within the lease on attempt 4 of 4"


def test_releasing_a_job_whose_cancel_was_requested_ends_it_cancelled(server, user, queued_job):
    attempt = claim(server, queued_job["id"])
    assert user.post(f"/jobs/{queued_job['id']}/cancel").status_code == 202
    sent_before = len(server.sent_for(queued_job["id"]))
    response = attempt.post("release", {})
    assert response.status_code == 200
    job = user.get(f"/jobs/{queued_job['id']}").json()
    assert job["status"] == "cancelled"
    assert job["stop_reason"] == "cancelled by user (worker stopping)"
    assert len(server.sent_for(queued_job["id"])) == sent_before


def test_a_lost_attempt_is_a_restart_and_past_max_restarts_fails_with_its_reason(make_server):
    """A rank or node of a data-parallel run died: its node 0 reports the attempt lost."""
    srv = make_server()
    with srv.new_user() as user:
        job = submit(user, job_spec(upload(user)["id"], max_restarts=1))
        first = claim(srv, job["id"])
        sent_before = len(srv.sent_for(job["id"]))
        reason = "lost a rank of the run at epoch 2, step 40: Connection reset by peer"
        lost = first.post("release", {"reason": reason, "lost": True})
        assert lost.status_code == 200, lost.text
        assert (lost.json()["status"], lost.json()["attempt"]) == ("queued", 2)
        assert len(srv.sent_for(job["id"])) == sent_before + 1  # woken at once
        # its retry is stale: a lost attempt is over, unlike a released one
        assert first.post("release", {"reason": reason, "lost": True}).status_code == 409

        second = claim(srv, job["id"], "host:2")  # the one restart
        assert second.post("release", {"reason": reason, "lost": True}).status_code == 200
        final = user.get(f"/jobs/{job['id']}").json()
        assert final["status"] == "failed"
        assert final["error"] == f"{reason} on attempt 2 of 2"
        with session_scope(srv.sessions) as session:
            outcomes = session.execute(
                select(Attempt.n, Attempt.outcome)
                .where(Attempt.job_id == job["id"])
                .order_by(Attempt.n)
            ).all()
        assert [tuple(row) for row in outcomes] == [(1, "lost"), (2, "lost")]
