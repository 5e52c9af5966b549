"""The reconciler: lost wake-ups are sent again, waiting ones are not; expired leases requeue.

Servers of one backend share a database, so a round may also act on other tests'
jobs: the assertions look only at this test's own.
"""

from __future__ import annotations

import time

from app.db import session_scope
from app.dispatch import Dispatcher
from app.reconciler import Reconciler, reconcile
from tests.app.conftest import claim, job_spec, submit, upload


def run_reconciler(srv, dispatcher=None):
    with session_scope(srv.sessions) as session:
        return reconcile(session, srv.settings, dispatcher or srv.app.state.dispatcher)


def test_a_wakeup_the_broker_lost_is_sent_again_after_requeue_after_s(make_server):
    srv = make_server(requeue_after_s=0.2)
    with srv.new_user() as user:
        dataset = upload(user)
        lost = submit(user, job_spec(dataset["id"]))
        waiting = submit(user, job_spec(dataset["id"]))
        # the broker loses one message; the other job is still waiting its turn
        [message] = srv.sent_for(lost["id"])
        message["path"].unlink()

        mine = {lost["id"], waiting["id"]}
        # too early: not unclaimed for requeue_after_s yet
        assert not mine & set(run_reconciler(srv).resent)
        time.sleep(0.3)
        assert mine & set(run_reconciler(srv).resent) == {lost["id"]}
        assert len(srv.sent_for(lost["id"])) == 1
        assert len(srv.sent_for(waiting["id"])) == 1  # not sent twice

        time.sleep(0.3)
        assert not mine & set(run_reconciler(srv).resent)  # the broker holds both again


def test_a_lost_wakeup_of_a_gpu_set_queue_another_api_process_sent_is_sent_again(make_server):
    srv = make_server(requeue_after_s=0.2)
    with srv.new_user() as user:
        dataset = upload(user)
        spec = job_spec(dataset["id"], training__device="auto", resources={"gpus": 2})
        job = submit(user, spec)
        [message] = srv.sent_for(job["id"])
        assert message["queue"] == "gpu2"
        message["path"].unlink()
        time.sleep(0.3)
        # the reconciler of another API process, which never sent to gpu2 itself
        other = Dispatcher(srv.settings.broker_url, srv.settings.home)
        try:
            first, second = run_reconciler(srv, other), run_reconciler(srv, other)
        finally:
            other.close()
        assert job["id"] not in first.resent  # gpu2 first seen: its depth read from then on
        assert job["id"] in second.resent
        assert [m["queue"] for m in srv.sent_for(job["id"])] == ["gpu2"]


def test_claimed_and_cancelled_jobs_are_not_sent_again(make_server):
    srv = make_server(requeue_after_s=0.1)
    with srv.new_user() as user:
        dataset = upload(user)
        running = submit(user, job_spec(dataset["id"]))
        cancelled = submit(user, job_spec(dataset["id"]))
        claim(srv, running["id"])
        user.post(f"/jobs/{cancelled['id']}/cancel")
        for message in srv.broker_messages():
            message["path"].unlink()
        time.sleep(0.2)
        resent = set(run_reconciler(srv).resent)
        assert running["id"] not in resent and cancelled["id"] not in resent


def test_the_background_reconciler_requeues_a_lost_worker(make_server):
    srv = make_server(reconcile=True, lease_s=0.3, reconcile_interval_s=0.1)
    with srv.new_user() as user:
        dataset = upload(user)
        job = submit(user, job_spec(dataset["id"]))
        attempt = claim(srv, job["id"])
        deadline = time.monotonic() + 10
        while user.get(f"/jobs/{job['id']}").json()["status"] != "queued":
            assert time.monotonic() < deadline, "the lease never expired"
            time.sleep(0.05)
        assert user.get(f"/jobs/{job['id']}").json()["attempt"] == 2
        assert attempt.post("heartbeat", {"progress": {}}).status_code == 409


def test_a_lost_worker_of_a_job_asked_to_cancel_ends_it_cancelled(make_server):
    srv = make_server(lease_s=0.1)
    with srv.new_user() as user:
        dataset = upload(user)
        job = submit(user, job_spec(dataset["id"]))
        claim(srv, job["id"])
        user.post(f"/jobs/{job['id']}/cancel")
        time.sleep(0.15)
        assert job["id"] not in run_reconciler(srv).requeued
        assert user.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"


def test_the_running_jobs_limit_holds_a_job_in_the_queue(make_server):
    srv = make_server(max_running_jobs_per_user=1)
    with srv.new_user() as user:
        dataset = upload(user)
        first = submit(user, job_spec(dataset["id"]))
        second = submit(user, job_spec(dataset["id"]))
        attempt = claim(srv, first["id"])
        with srv.worker() as worker:
            held = worker.post(f"/worker/jobs/{second['id']}/claim", json={"worker": "w:2"})
        assert held.status_code == 409
        assert user.get(f"/jobs/{second['id']}").json()["status"] == "queued"
        attempt.post("finish", {"status": "succeeded", "result": {}})
        claim(srv, second["id"])


def test_a_lease_that_ran_out_while_the_api_was_down_gets_a_full_lease_after(make_server):
    """No worker could heartbeat while the API was down: its first rounds expire nothing."""
    srv = make_server(lease_s=0.3)
    with srv.new_user() as user:
        dataset = upload(user)
        job = submit(user, job_spec(dataset["id"]))
        attempt = claim(srv, job["id"])
        time.sleep(0.4)  # the lease ran out with no reconciler running: the API was down
        settings = srv.settings.model_copy(update={"lease_s": 1.5, "reconcile_interval_s": 0.05})
        reconciler = Reconciler(srv.sessions, settings, srv.app.state.dispatcher)
        reconciler.start()  # the API is back
        try:
            time.sleep(0.5)
            assert user.get(f"/jobs/{job['id']}").json()["status"] == "running"
            assert attempt.post("heartbeat", {"progress": {}}).status_code == 200  # reports in
            deadline = time.monotonic() + 10  # silent from now on: expired after the grace
            while user.get(f"/jobs/{job['id']}").json()["status"] != "queued":
                assert time.monotonic() < deadline, "the lease never expired"
                time.sleep(0.05)
        finally:
            reconciler.stop()


WAIT_S = 1.0


def test_an_auto_job_no_gpu_worker_took_is_handed_to_the_cpu_queue_once(make_server):
    srv = make_server(auto_gpu_wait_s=WAIT_S)  # a round within it, under load too
    with srv.new_user() as user:
        dataset = upload(user)
        waiting = submit(user, job_spec(dataset["id"], training__device="auto"))
        taken = submit(user, job_spec(dataset["id"], training__device="auto"))
        assert [m["queue"] for m in srv.sent_for(waiting["id"])] == ["auto"]
        claim(srv, taken["id"])  # a GPU worker took this one in time
        assert waiting["id"] not in run_reconciler(srv).to_cpu  # still within the wait
        time.sleep(WAIT_S + 0.1)
        moved = set(run_reconciler(srv).to_cpu)
        assert waiting["id"] in moved and taken["id"] not in moved
        # Both wake-ups stand: the first worker of either kind to claim runs it.
        assert sorted(m["queue"] for m in srv.sent_for(waiting["id"])) == ["auto", "cpu"]
        assert user.get(f"/jobs/{waiting['id']}").json()["queue"] == "cpu"
        time.sleep(WAIT_S + 0.1)
        assert waiting["id"] not in run_reconciler(srv).to_cpu  # handed over once
        assert len(srv.sent_for(waiting["id"])) == 2


def test_without_gpu_workers_auto_jobs_go_to_the_cpu_queue_at_once(make_server):
    srv = make_server(auto_gpu_wait_s=0)
    with srv.new_user() as user:
        job = submit(user, job_spec(upload(user)["id"], training__device="auto"))
        assert [m["queue"] for m in srv.sent_for(job["id"])] == ["cpu"]
        assert job["queue"] == "cpu"
