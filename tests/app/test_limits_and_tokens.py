"""Who gets in, and how much they may ask for.

`torchyard token create NAME` run as a real command against a SQLite home: the token
it prints works over HTTP and only its hash is in the database file. Bad or missing
tokens are 401; each kind of token reaches only its own routes. Every limit is
configurable and answers with a message naming the limit.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.app.conftest import Server, claim, job_spec, server_settings, submit, upload


def token_create(home: Path, name: str) -> str:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TORCHYARD_")}
    env["TORCHYARD_HOME"] = str(home)
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "token", "create", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    token = done.stdout.strip()
    assert token.startswith("ty_") and "\n" not in token and len(token) > 40
    return token


def database_bytes(home: Path) -> bytes:
    # the WAL holds committed pages until a checkpoint: read it too
    return b"".join(p.read_bytes() for p in sorted(home.glob("torchyard.db*")))


def test_token_create_prints_a_token_that_works_over_http_and_is_stored_hashed(tmp_path):
    home = tmp_path / "home"
    raw = token_create(home, "alice")
    stored = database_bytes(home)
    assert raw.encode() not in stored
    assert hashlib.sha256(raw.encode()).hexdigest().encode() in stored

    srv = Server(server_settings(home, f"sqlite:///{home / 'torchyard.db'}"))
    try:
        with srv.client(raw) as alice:
            dataset = upload(alice)
            assert [d["id"] for d in alice.get("/datasets").json()] == [dataset["id"]]
        with srv.client(raw[:-1] + ("x" if raw[-1] != "x" else "y")) as forged:
            response = forged.get("/datasets")
            assert response.status_code == 401
            assert response.json() == {"detail": "invalid token"}
    finally:
        srv.stop()
    assert raw.encode() not in database_bytes(home)


def test_missing_malformed_and_unknown_tokens_are_401_saying_which(server, user):
    token = user.headers["authorization"].removeprefix("Bearer ")
    with server.client() as anonymous:
        cases = {
            None: "missing bearer token (Authorization: Bearer <token>)",
            f"Basic {token}": "missing bearer token (Authorization: Bearer <token>)",
            "Bearer": "missing bearer token (Authorization: Bearer <token>)",
            f"Token {token}": "missing bearer token (Authorization: Bearer <token>)",
            "Bearer ty_unknown": "invalid token",
            f"Bearer {token}x": "invalid token",
            "Bearer " + "x" * 8_000: "invalid token",
            "Bearer ty_\xc3\xa9": "invalid token",  # UTF-8 bytes of a non-ASCII token
        }
        for header, detail in cases.items():
            headers = {"Authorization": header.encode("latin-1")} if header is not None else {}
            response = anonymous.get("/jobs", headers=headers)
            assert response.status_code == 401, (header, response.text)
            assert response.json() == {"detail": detail}, header
            assert response.headers["www-authenticate"] == "Bearer"
        # the scheme is case-insensitive, as HTTP says
        assert (
            anonymous.get("/jobs", headers={"Authorization": f"bearer {token}"}).status_code == 200
        )


def test_each_kind_of_token_reaches_only_its_own_routes(server, user, queued_job):
    job = queued_job["id"]
    attempt = claim(server, job)
    attempt_token = attempt.claim["token"]
    user_token = user.headers["authorization"].removeprefix("Bearer ")
    with server.worker() as worker:  # the shared worker secret: claims only
        response = worker.get("/jobs")
        assert (response.status_code, response.json()) == (401, {"detail": "invalid token"})
        response = worker.post(f"/worker/jobs/{job}/heartbeat", json={})
        assert response.json() == {"detail": "invalid attempt token"}
    with server.client(attempt_token) as attempt_client:  # one attempt: its job's reports only
        assert attempt_client.get(f"/jobs/{job}").status_code == 401
        response = attempt_client.post(f"/worker/jobs/{job}/claim", json={"worker": "x"})
        assert response.json() == {"detail": "invalid worker token"}
    with server.client(user_token) as as_user:
        response = as_user.post(f"/worker/jobs/{job}/claim", json={"worker": "x"})
        assert (response.status_code, response.json()) == (401, {"detail": "invalid worker token"})
        response = as_user.get(f"/worker/datasets/{queued_job['spec']['data']['train']}")
        assert (response.status_code, response.json()) == (401, {"detail": "invalid attempt token"})


# ------------------------------------------------------------------ limits


def test_spec_and_request_size_limits_are_configurable_and_name_the_limit(make_server):
    small = make_server(max_spec_bytes=4_000)
    with small.new_user() as client:
        dataset = upload(client)
        spec = job_spec(dataset["id"], name="x" * 5_000)
        response = client.post("/jobs", json=spec)
        assert response.status_code == 413
        assert response.json()["detail"].endswith("exceeds the limit of 4,000 bytes")
        # every other body is held to the same limit
        response = client.post(f"/jobs/{'0' * 20}/cancel", content=b"x" * 5_000)
        assert response.status_code == 413
        assert response.json()["detail"] == (
            "request body of 5,000 bytes exceeds the limit of 4,000 bytes"
        )
        assert client.post("/jobs", json=job_spec(dataset["id"])).status_code == 201


def test_parameter_and_epoch_limits_are_configurable_and_name_the_limit(make_server):
    strict = make_server(max_params=50, max_epochs=5)
    with strict.new_user() as client:
        dataset = upload(client)
        response = client.post("/jobs/validate", json=job_spec(dataset["id"]))
        assert response.status_code == 422
        assert response.json()["detail"] == [
            {"path": "model", "message": "67 parameters, more than the limit of 50"}
        ]
        small_model = {"layers": [{"type": "linear", "out_features": 3}]}
        response = client.post(
            "/jobs", json=job_spec(dataset["id"], model=small_model, training__epochs=6)
        )
        assert response.status_code == 422
        assert response.json()["detail"] == [
            {"path": "training.epochs", "message": "this service runs at most 5 epochs, found 6"}
        ]
        assert client.get("/jobs").json()["jobs"] == []
        job = submit(client, job_spec(dataset["id"], model=small_model, training__epochs=5))
        assert job["status"] == "queued"


def test_running_jobs_per_user_are_limited_and_the_rest_wait_queued(make_server):
    limited = make_server(max_running_jobs_per_user=1)
    with limited.new_user() as alice, limited.new_user() as bob:
        first = submit(alice, job_spec(upload(alice)["id"]))
        second = submit(alice, job_spec(upload(alice)["id"]))
        bobs = submit(bob, job_spec(upload(bob)["id"]))
        claim(limited, first["id"])
        with limited.worker() as worker:
            response = worker.post(f"/worker/jobs/{second['id']}/claim", json={"worker": "w"})
        assert response.status_code == 409
        assert response.json() == {
            "detail": "the job's owner already has 1 running job(s) (limit 1)"
        }
        assert alice.get(f"/jobs/{second['id']}").json()["status"] == "queued"
        # another user's job is not held back by alice's
        claim(limited, bobs["id"])
        assert bob.get(f"/jobs/{bobs['id']}").json()["status"] == "running"


def test_no_pickle_reads_user_bytes_anywhere():
    """The service's own code never unpickles: weights are safetensors, training state loads
    with weights_only, NPZ/NPY with allow_pickle=False (the upload tests prove the refusal)."""
    root = Path(__file__).resolve().parents[2]
    sources = [*sorted((root / "app").rglob("*.py")), *sorted((root / "worker").rglob("*.py"))]
    assert len(sources) > 20
    for path in sources:
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        assert "allow_pickle=True" not in text, path
        assert "weights_only=False" not in text, path


@pytest.mark.parametrize("resources", [{"processes": 2}, {"processes": 2, "nodes": 2}])
def test_a_job_of_several_cpu_ranks_or_nodes_is_accepted(make_server, resources):
    server = make_server()
    with server.new_user() as client:
        dataset = upload(client)
        response = client.post("/jobs", json=job_spec(dataset["id"], resources=resources))
        assert response.status_code == 201, response.text
        assert response.json()["spec"]["resources"] == resources


@pytest.mark.parametrize("nodes", [1, 2])
def test_a_job_of_several_gpus_a_node_waits_in_its_own_queue_for_a_worker_holding_that_many(
    make_server, nodes
):
    server = make_server()
    with server.new_user() as client:
        dataset = upload(client)
        spec = job_spec(dataset["id"], resources={"gpus": 2, "nodes": nodes})
        spec["training"]["device"] = "auto"  # gpus 2 on cpu is refused for that reason
        response = client.post("/jobs", json=spec)
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["queue"] == "gpu2" and job["status"] == "queued"
        # a wake-up for each node's worker, in the queue only `--gpu 0,1` workers take
        assert [m["queue"] for m in server.sent_for(job["id"])] == ["gpu2"] * nodes
