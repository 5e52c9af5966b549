"""Ids and paths: unknown and foreign ids are 404; `..`, `%2e%2e%2f`, absolute paths and
backslashes in any path-like parameter are a 4xx, never a 5xx, never a file served or
written outside the artifact root.

Raw requests go through http.client, which sends the path exactly as written (httpx
would normalise `..` away before the server ever saw it).
"""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path

import httpx

from tests.app.conftest import Server, claim, job_spec, submit, upload

TRAVERSALS = [
    "..",
    "..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%2e%2e",
    "%2Fetc%2Fpasswd",
    "..%5C..%5Cwindows%5Cwin.ini",
    "C:%5Cwindows%5Cwin.ini",
    "%00",
    "....%2f%2f",
    "%252e%252e%252f",
]


def raw_get(server: Server, path: str, token: str) -> tuple[int, dict[str, str], bytes]:
    host = server.url.removeprefix("http://")
    connection = http.client.HTTPConnection(host, timeout=10)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def token_of(client) -> str:
    return client.headers["authorization"].removeprefix("Bearer ")


def snapshot(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_unknown_ids_are_404_naming_the_id(user, queued_job):
    missing = "0" * 20
    job = queued_job["id"]
    for path, detail in {
        f"/jobs/{missing}": f"no job '{missing}'",
        f"/jobs/{missing}/metrics": f"no job '{missing}'",
        f"/jobs/{missing}/logs": f"no job '{missing}'",
        f"/jobs/{missing}/events": f"no job '{missing}'",
        f"/jobs/{missing}/checkpoints": f"no job '{missing}'",
        f"/jobs/{missing}/checkpoints/best": f"no job '{missing}'",
        f"/jobs/{job}/checkpoints/best": f"job '{job}' has no best checkpoint yet",
        f"/jobs/{job}/checkpoints/99": f"no checkpoint 99 in job '{job}'",
        f"/datasets/{missing}": f"no dataset '{missing}'",
    }.items():
        response = user.get(path)
        assert response.status_code == 404, path
        assert response.json() == {"detail": detail}, path
    assert user.post(f"/jobs/{missing}/cancel").json() == {"detail": f"no job '{missing}'"}
    assert user.delete(f"/datasets/{missing}").json() == {"detail": f"no dataset '{missing}'"}


def test_another_users_ids_look_exactly_like_unknown_ones(server, user, dataset, queued_job):
    job = queued_job["id"]
    with server.new_user() as other:
        for path in (f"/jobs/{job}", f"/jobs/{job}/events", f"/datasets/{dataset['id']}"):
            response = other.get(path)
            assert response.status_code == 404
            what = "dataset" if path.startswith("/datasets") else "job"
            assert response.json() == {"detail": f"no {what} '{path.split('/')[2]}'"}
        # and their ids are no use in a spec either
        response = other.post("/jobs/validate", json=job_spec(dataset["id"]))
        assert response.status_code == 422
        assert response.json()["detail"][0]["path"] == "data.train"


def test_traversal_in_user_path_parameters_is_a_4xx_and_serves_no_file(server, user, queued_job):
    token = token_of(user)
    base = server.settings.home.parent
    before = snapshot(base)
    job = queued_job["id"]
    templates = [
        "/api/v1/jobs/{}",
        "/api/v1/jobs/{}/metrics",
        "/api/v1/jobs/{}/checkpoints",
        "/api/v1/jobs/{}/checkpoints/best",
        f"/api/v1/jobs/{job}/checkpoints/{{}}",
        "/api/v1/datasets/{}",
        "/api/v1/{}",
    ]
    for template in templates:
        for bad in TRAVERSALS:
            status, headers, body = raw_get(server, template.format(bad), token)
            assert 400 <= status < 500 or status == 307, (template, bad, status, body)
            if status == 307:  # a trailing-slash redirect stays on this API
                assert headers["location"].startswith(server.url + "/api/v1/"), headers
            else:
                assert isinstance(json.loads(body)["detail"], str | list)
            assert b"root:" not in body
    # with no slash to decode, `..` reaches the route as an id, and is an unknown one
    status, _, body = raw_get(server, "/api/v1/jobs/..", token)
    assert status == 404 and json.loads(body) == {"detail": "no job '..'"}
    status, _, body = raw_get(server, "/api/v1/datasets/C:%5Cwindows", token)
    assert status == 404 and json.loads(body) == {"detail": "no dataset 'C:\\\\windows'"}
    # a checkpoint id is a number in range
    status, _, body = raw_get(server, f"/api/v1/jobs/{job}/checkpoints/..%2f..", token)
    assert status == 404
    status, _, body = raw_get(server, f"/api/v1/jobs/{job}/checkpoints/99999999999999999999", token)
    assert status == 422
    assert json.loads(body)["detail"][0]["path"] == "path.checkpoint_id"
    # the download format is an enum, not a file name
    response = user.get(f"/jobs/{job}/checkpoints/best", params={"format": "../../etc/passwd"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["path"] == "query.format"
    assert snapshot(base) - before <= {p for p in snapshot(base) if p.name.startswith("torchyard")}


def test_traversal_in_worker_path_parameters_is_a_4xx_and_writes_nothing_outside(
    server, user, dataset, queued_job
):
    job = queued_job["id"]
    attempt = claim(server, job)
    token = attempt.claim["token"]
    base = server.settings.home.parent
    root = server.settings.artifact_dir.resolve()
    before = snapshot(base)
    for bad in TRAVERSALS:
        for path in (f"/api/v1/worker/datasets/{bad}", f"/api/v1/worker/jobs/{bad}/resume"):
            status, _, body = raw_get(server, path, token)
            assert 400 <= status < 500 or status == 307, (path, status, body)
            assert b"root:" not in body
    weights = b"weights"
    sha = hashlib.sha256(weights).hexdigest()
    statuses: dict[tuple[str, str], int] = {}
    for kind, epoch in (("..%2f..%2f..%2fevil", "0"), ("best", "..%2f..%2fevil"), ("best", "-1")):
        host = server.url.removeprefix("http://")
        connection = http.client.HTTPConnection(host, timeout=10)
        connection.request(
            "PUT",
            f"/api/v1/worker/jobs/{job}/checkpoints/{kind}/{epoch}",
            body=weights,
            headers={"Authorization": f"Bearer {token}", "X-Sha256": sha},
        )
        response = connection.getresponse()
        statuses[(kind, epoch)] = response.status
        response.read()
        connection.close()
    # an encoded "/" is a path separator to the router (no route: 404); -1 is no epoch
    assert statuses == {
        ("..%2f..%2f..%2fevil", "0"): 404,
        ("best", "..%2f..%2fevil"): 404,
        ("best", "-1"): 422,
    }
    # a well-formed upload lands inside the root, under a name made from the job, epoch and sha
    response = attempt.client.put(
        f"/worker/jobs/{job}/checkpoints/best/0", content=weights, headers={"X-Sha256": sha}
    )
    assert response.status_code == 201
    new = snapshot(base) - before
    inside = {p for p in new if p.resolve().is_relative_to(root)}
    assert [p.relative_to(root).as_posix() for p in inside] == [
        f"jobs/{job}/checkpoints/best-0-{sha[:16]}.safetensors"
    ]
    assert all(p.name.startswith("torchyard.db") for p in new - inside), new - inside


def test_an_attempt_token_reaches_only_its_own_jobs_files(server, user, queued_job):
    theirs = upload(user, None, "theirs.npz")
    with server.new_user() as stranger:
        foreign = upload(stranger)
    other_job = submit(user, job_spec(theirs["id"]))
    attempt = claim(server, queued_job["id"])
    for path in (
        f"/worker/datasets/{foreign['id']}",  # another user's dataset
        f"/worker/datasets/{theirs['id']}",  # the same user's, but not this job's
        f"/worker/jobs/{other_job['id']}/resume",
    ):
        response = attempt.client.get(path)
        assert response.status_code == 404, path
        assert response.json()["detail"].startswith("no "), response.text
    # its own dataset, yes
    [own] = attempt.claim["datasets"].values()
    assert attempt.client.get(own["url"].removeprefix("/api/v1")).status_code == 200


def test_numbers_past_the_database_columns_are_422_naming_the_parameter(server, user, queued_job):
    """Were 500s: SQLite raised OverflowError, Postgres 'integer out of range'."""
    job = queued_job["id"]
    huge = str(10**20)
    for path, where in (
        (f"/jobs/{job}/checkpoints/{huge}", "path.checkpoint_id"),
        (f"/jobs/{job}/metrics?since_step={huge}", "query.since_step"),
        (f"/jobs/{job}/events?after={huge}", "query.after"),
    ):
        response = user.get(path)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["detail"][0]["path"] == where
    attempt = claim(server, job)
    response = attempt.post("heartbeat", {"progress": {"step": 2**63}})
    assert response.status_code == 422
    assert response.json()["detail"][0]["path"] == "body.progress.step"
    point = {"name": "loss", "step": 0, "epoch": 2**31, "value": 1.0, "time": 0.0}
    response = attempt.post("metrics", {"points": [point]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["path"] == "body.points[0].epoch"
    response = attempt.client.put(
        f"/worker/jobs/{job}/checkpoints/best/{2**31}",
        content=b"w",
        headers={"X-Sha256": hashlib.sha256(b"w").hexdigest()},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["path"] == "path.epoch"
    # a Last-Event-ID past every id means "after all of them": the stream waits, no error
    with user.stream(
        "GET", f"/jobs/{job}/events", headers={"Last-Event-ID": huge}, timeout=3
    ) as stream:
        assert stream.status_code == 200


def test_any_last_event_id_is_a_clean_answer(server, user, queued_job):
    """A Last-Event-ID is an event id (ASCII digits, any length) or it is 422; never a 500.

    10,000 digits was a 500: int() refuses more than 4,300. Past the largest id, of any
    length, it means "after all of them"; empty is no id (the stream starts at the top).
    """
    job = queued_job["id"]

    def first_frame(last_id: str | bytes) -> tuple[int, str]:
        with user.stream(
            "GET", f"/jobs/{job}/events", headers={"Last-Event-ID": last_id}, timeout=3
        ) as stream:
            if stream.status_code != 200:
                stream.read()
                return stream.status_code, stream.text
            try:
                for line in stream.iter_lines():
                    if line.startswith("id:"):
                        return 200, line
            except httpx.ReadTimeout:
                return 200, ""  # nothing after that id yet: the stream waits
        return 200, ""

    status, first = first_frame("")
    assert status == 200 and first.startswith("id:")  # from the top
    assert first_frame("1" * 10_000) == (200, "")
    assert first_frame("0" * 10_000 + "0") == (200, first)  # zero: from the top
    # headers travel as bytes: Arabic-Indic digits in UTF-8, and "²" in Latin-1, which
    # the server reads back as "²" (str.isdigit() says yes, int() says no: was a 500)
    unicode_digits = ("١٢٣".encode(), "²".encode("latin-1"))
    for garbage in ("-1", "abc", "1e3", "0x10", "12 34", "+5", *unicode_digits):
        status, text = first_frame(garbage)
        assert status == 422, (garbage, text)
        [issue] = json.loads(text)["detail"]
        assert issue["path"] == "header.Last-Event-ID"
        assert issue["message"].startswith("an event id is a number of digits 0-9, found ")
    response = user.get(f"/jobs/{job}/events", params={"after": "9" * 10_000})
    assert response.status_code == 422
    assert response.json()["detail"][0]["path"] == "query.after"


def test_values_the_database_cannot_store_are_422_not_500(server, user, queued_job):
    """PostgreSQL refuses U+0000 in text; SQLite keeps it. Either way, no 500."""
    attempt = claim(server, queued_job["id"])
    for what, body in (
        (
            "metrics",
            {"points": [{"name": "lo\x00ss", "step": 0, "epoch": 0, "value": 1.0, "time": 0}]},
        ),
        ("logs", {"lines": ["a\x00b"]}),
    ):
        response = attempt.post(what, body)
        if "postgresql" in server.settings.database_url:
            assert response.status_code == 422, response.text
            assert response.json()["detail"].startswith("a value in the request cannot be stored: ")
        else:
            assert response.status_code == {"metrics": 200, "logs": 204}[what], response.text
    response = user.get(f"/jobs/{queued_job['id']}/metrics", params={"names": "a\x00b"})
    postgres = "postgresql" in server.settings.database_url
    assert response.status_code == (422 if postgres else 200), response.text
    assert user.get(f"/jobs/{queued_job['id']}").json()["status"] == "running"
