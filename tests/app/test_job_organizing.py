"""Projects, tags and notes: shown, filtered, sorted, paged, edited; finished jobs deleted."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from sqlalchemy import text

from app.db import session_scope
from tests.app.conftest import claim, job_spec, submit, upload

# Every table that holds rows of a job (a deleted job leaves none).
JOB_TABLES = (
    "jobs:id",
    "job_tags:job_id",
    "job_datasets:job_id",
    "attempts:job_id",
    "metric_chunks:job_id",
    "metric_rollups:job_id",
    "checkpoints:job_id",
    "job_events:job_id",
)


def finish(server, job_id: str, best: float | None, status: str = "succeeded") -> None:
    attempt = claim(server, job_id)
    result = {"status": status, "monitor": "loss", "best_value": best, "best_epoch": 0}
    assert attempt.post("finish", {"status": status, "result": result}).status_code == 200


def listed(client, **params: Any) -> list[dict[str, Any]]:
    """Every job the query lists, page by page (`limit` sets the page size)."""
    seen, cursor = [], None
    while True:
        response = client.get("/jobs", params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        page = response.json()
        seen += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


def rows_of(server, job_id: str) -> dict[str, int]:
    with session_scope(server.sessions) as session:
        return {
            table: session.execute(
                text(f"SELECT count(*) FROM {table} WHERE {column} = :id"), {"id": job_id}
            ).scalar_one()
            for table, column in (entry.split(":") for entry in JOB_TABLES)
        }


def test_submitted_metadata_is_shown_by_the_job_and_the_list(user, dataset):
    plain = submit(user, job_spec(dataset["id"]))
    assert (plain["project"], plain["tags"], plain["note"]) == ("default", [], "")
    spec = job_spec(dataset["id"], project="vision/mnist", tags=["cnn", "lr:1e-3", "cnn"])
    spec["note"] = "first try\nwith a smaller batch"
    job = submit(user, spec)
    assert job["project"] == "vision/mnist"
    assert job["tags"] == ["cnn", "lr:1e-3"]  # in order, each once
    assert job["note"] == "first try\nwith a smaller batch"
    shown = user.get(f"/jobs/{job['id']}").json()
    assert (shown["project"], shown["tags"], shown["note"]) == (
        "vision/mnist",
        ["cnn", "lr:1e-3"],
        "first try\nwith a smaller batch",
    )
    [summary] = [j for j in user.get("/jobs").json()["jobs"] if j["id"] == job["id"]]
    assert (summary["project"], summary["tags"]) == ("vision/mnist", ["cnn", "lr:1e-3"])


def test_bad_metadata_in_a_spec_is_422_with_paths(user, dataset):
    spec = job_spec(dataset["id"], project="a,b", tags=["ok", " padded", "x" * 65])
    spec["note"] = "n" * 10_001
    response = user.post("/jobs", json=spec)
    assert response.status_code == 422
    issues = {issue["path"]: issue["message"] for issue in response.json()["detail"]}
    assert set(issues) == {"project", "tags[1]", "tags[2]", "note"}
    assert "','" in issues["project"]
    assert "space" in issues["tags[1]"]
    assert "64" in issues["tags[2]"]
    assert "10,000" in issues["note"]
    too_many = job_spec(dataset["id"], tags=[f"t{i}" for i in range(33)])
    [issue] = user.post("/jobs", json=too_many).json()["detail"]
    assert issue["path"] == "tags" and "32" in issue["message"]


def test_filters_combine_with_and(server, user, dataset):
    def make(name: str, project: str, tags: list[str]) -> str:
        return submit(user, job_spec(dataset["id"], name=name, project=project, tags=tags))["id"]

    a = make("ResNet-50 base", "vision", ["gpu", "baseline"])
    b = make("resnet-18 small", "vision", ["gpu"])
    c = make("bert", "nlp", ["gpu", "baseline"])
    d = make("100%_done", "vision", [])
    assert user.post(f"/jobs/{b}/cancel").status_code == 202

    def ids(**params: Any) -> list[str]:
        return [job["id"] for job in listed(user, **params)]

    assert ids(project="vision") == [d, b, a]
    assert ids(tag="gpu") == [c, b, a]
    assert ids(tag=["gpu", "baseline"]) == [c, a]  # every tag must match
    assert ids(tag="gpu", project="vision") == [b, a]
    assert ids(tag="gpu", project="vision", status="queued") == [a]
    assert ids(name="RESNET") == [b, a]  # a substring, any case
    assert ids(name="resnet", tag="baseline") == [a]
    assert ids(name="%_") == [d]  # LIKE wildcards are plain characters
    assert ids(project="nowhere") == []
    assert ids(tag="gpu", limit=1, order="asc") == [a, b, c]


def test_sort_by_best_pages_through_ties_with_jobs_without_a_value_last(server, user, dataset):
    values = [0.5, None, 0.25, 0.5, 0.75, 0.5, None, 0.25]
    made = [submit(user, job_spec(dataset["id"], project="best-sort"))["id"] for _ in values]
    for job_id, value in zip(made, values, strict=True):
        finish(server, job_id, value)
    best = dict(zip(made, values, strict=True))
    valued = sorted((v, i) for i, v in best.items() if v is not None)
    empty = sorted(i for i, v in best.items() if v is None)

    ascending = [i for _, i in valued] + empty
    descending = [i for _, i in reversed(valued)] + empty[::-1]
    for limit in (1, 2, 3, 50):
        # asc is the default order of sort=best: lowest first, as for a loss
        found = listed(user, project="best-sort", sort="best", limit=limit)
        assert [job["id"] for job in found] == ascending
        found = listed(user, project="best-sort", sort="best", order="desc", limit=limit)
        assert [job["id"] for job in found] == descending


def test_pages_of_a_filtered_list_neither_repeat_nor_skip_jobs_added_meanwhile(user, dataset):
    first = [submit(user, job_spec(dataset["id"], tags=["paged"]))["id"] for _ in range(3)]
    page = user.get("/jobs", params={"tag": "paged", "limit": 2}).json()
    assert [j["id"] for j in page["jobs"]] == first[:0:-1]
    submit(user, job_spec(dataset["id"], tags=["paged"]))  # newer: before the cursor
    rest = user.get("/jobs", params={"tag": "paged", "limit": 2, "cursor": page["next_cursor"]})
    assert [j["id"] for j in rest.json()["jobs"]] == [first[0]]
    assert rest.json()["next_cursor"] is None


def test_bad_list_parameters_are_422_naming_the_parameter(user, dataset):
    for _ in range(2):
        submit(user, job_spec(dataset["id"]))
    bad = {
        "status": {"status": "done"},
        "sort": {"sort": "name"},
        "order": {"order": "up"},
        "limit": {"limit": 0},
        "name": {"name": ""},
        "project": {"project": "a,b"},
        "tag": {"tag": ["ok", " x"]},
        "cursor": {"cursor": "%%%"},
    }
    for parameter, params in bad.items():
        response = user.get("/jobs", params=params)
        assert response.status_code == 422, (parameter, response.text)
        paths = [issue["path"] for issue in response.json()["detail"]]
        assert any(path.startswith(f"query.{parameter}") for path in paths), paths
    cursor = user.get("/jobs", params={"limit": 1}).json()["next_cursor"]
    assert cursor is not None
    other_sort = user.get("/jobs", params={"limit": 1, "sort": "best", "cursor": cursor})
    assert other_sort.status_code == 422
    [issue] = other_sort.json()["detail"]
    assert issue["path"] == "query.cursor" and "sort=created" in issue["message"]


def test_projects_count_the_users_own_jobs_by_status(server, user, dataset):
    a = submit(user, job_spec(dataset["id"], project="p1"))
    submit(user, job_spec(dataset["id"], project="p1"))
    submit(user, job_spec(dataset["id"]))
    user.post(f"/jobs/{a['id']}/cancel")
    with server.new_user() as other:
        submit(other, job_spec(upload(other)["id"], project="p1"))
        submit(other, job_spec(upload(other)["id"], project="theirs"))
    assert user.get("/projects").json() == [
        {"name": "default", "jobs": 1, "by_status": {"queued": 1}},
        {"name": "p1", "jobs": 2, "by_status": {"cancelled": 1, "queued": 1}},
    ]


def test_edit_changes_metadata_in_any_state_and_the_filters_follow(server, user, dataset):
    job = submit(user, job_spec(dataset["id"], project="before", tags=["a", "b"]))
    finish(server, job["id"], 0.5)  # terminal: metadata can still change
    edited = user.patch(f"/jobs/{job['id']}", json={"tags": ["b", "c", "c"], "note": "kept"})
    assert edited.status_code == 200, edited.text
    body = edited.json()
    assert (body["status"], body["project"], body["tags"], body["note"]) == (
        "succeeded",
        "before",
        ["b", "c"],
        "kept",
    )
    # the stored spec follows, so submitting it again carries the job's metadata
    assert (body["spec"]["tags"], body["spec"]["note"]) == (["b", "c"], "kept")
    assert [j["id"] for j in listed(user, tag="c")] == [job["id"]]
    assert listed(user, tag="a", project="before") == []

    moved = user.patch(f"/jobs/{job['id']}", json={"project": "after"}).json()
    assert (moved["project"], moved["tags"], moved["note"]) == ("after", ["b", "c"], "kept")
    again = user.patch(f"/jobs/{job['id']}", json={"project": "after"})  # idempotent
    assert again.json() == moved
    assert [j["id"] for j in listed(user, project="after", tag="b")] == [job["id"]]
    assert user.patch(f"/jobs/{job['id']}", json={"tags": []}).json()["tags"] == []
    assert listed(user, tag="b", project="after") == []


def test_bad_edits_are_422_with_body_paths(user, queued_job):
    url = f"/jobs/{queued_job['id']}"
    cases = {
        "body.tags[1]": {"tags": ["ok", "no,comma"]},
        "body.tags": {"tags": [f"t{i}" for i in range(33)]},
        "body.note": {"note": "x" * 10_001},
        "body.project": {"project": ""},
        "body.status": {"status": "succeeded"},  # not metadata: unknown here
    }
    for path, body in cases.items():
        response = user.patch(url, json=body)
        assert response.status_code == 422, (path, response.text)
        assert [issue["path"] for issue in response.json()["detail"]] == [path]
    nul = user.patch(url, json={"note": "a\x00b"})
    assert nul.status_code == 422
    assert user.get(url).json()["tags"] == []


def test_another_users_job_is_not_found_listed_or_counted(server, user, dataset):
    job = submit(user, job_spec(dataset["id"], project="mine", tags=["secret"]))
    finish(server, job["id"], 0.1)
    with server.new_user() as other:
        assert other.patch(f"/jobs/{job['id']}", json={"note": "x"}).status_code == 404
        assert other.delete(f"/jobs/{job['id']}").status_code == 404
        assert listed(other, tag="secret") == []
        assert listed(other, project="mine") == []
        assert other.get("/projects").json() == []
    assert user.get(f"/jobs/{job['id']}").json()["note"] == ""
    assert user.delete("/jobs/..").status_code == 404


def test_deleting_a_finished_job_removes_its_rows_and_files(server, user, dataset):
    job = submit(user, job_spec(dataset["id"], tags=["doomed"]))
    keep = submit(user, job_spec(dataset["id"], tags=["doomed"]))
    attempt = claim(server, job["id"])
    points = [
        {"name": "loss", "step": s, "epoch": 0, "value": 1.0 / (s + 1), "time": 1.7e9 + s}
        for s in range(200)
    ]
    assert attempt.post("metrics", {"points": points}).status_code == 200
    assert attempt.post("logs", {"lines": ["epoch 0 done"]}).status_code == 204
    weights = b"w" * 4096
    put = attempt.client.put(
        f"/worker/jobs/{job['id']}/checkpoints/best/0",
        content=weights,
        headers={"X-Sha256": hashlib.sha256(weights).hexdigest(), "X-Step": "199"},
    )
    assert put.status_code == 201, put.text
    assert attempt.post("finish", {"status": "succeeded", "result": {}}).status_code == 200
    folder = server.settings.artifact_dir / "jobs" / job["id"]
    [weights_file] = folder.rglob("*.safetensors")
    weights_file.with_suffix(".onnx").write_bytes(b"a cached export")
    before = rows_of(server, job["id"])
    assert all(before[t] > 0 for t in ("metric_chunks", "metric_rollups", "checkpoints"))

    assert user.delete(f"/jobs/{job['id']}").status_code == 204
    assert rows_of(server, job["id"]) == dict.fromkeys(before, 0)
    assert not folder.exists()
    assert user.get(f"/jobs/{job['id']}").status_code == 404
    assert user.get(f"/jobs/{job['id']}/metrics").status_code == 404
    assert user.get(f"/jobs/{job['id']}/logs").status_code == 404
    assert user.delete(f"/jobs/{job['id']}").status_code == 404  # gone: a retry finds nothing
    # the other job, and the dataset, are untouched
    assert [j["id"] for j in listed(user, tag="doomed")] == [keep["id"]]
    assert user.get(f"/datasets/{dataset['id']}").status_code == 200
    # the worker's token went with the attempt
    assert attempt.post("logs", {"lines": ["late"]}).status_code == 401


@pytest.mark.parametrize("state", ["queued", "running", "running, cancel requested"])
def test_deleting_a_queued_or_running_job_is_409(server, user, queued_job, state):
    if state != "queued":
        claim(server, queued_job["id"])
    if state.endswith("requested"):
        assert user.post(f"/jobs/{queued_job['id']}/cancel").status_code == 202
    response = user.delete(f"/jobs/{queued_job['id']}")
    assert response.status_code == 409
    assert "cancel it first" in response.json()["detail"]
    assert user.get(f"/jobs/{queued_job['id']}").status_code == 200


def test_a_dataset_a_running_job_needs_cannot_be_deleted(server, user, dataset):
    job = submit(user, job_spec(dataset["id"]))
    attempt = claim(server, job["id"])
    response = user.delete(f"/datasets/{dataset['id']}")
    assert response.status_code == 409 and job["id"] in response.json()["detail"]
    assert attempt.post("finish", {"status": "failed", "result": {}}).status_code == 200
    assert user.delete(f"/datasets/{dataset['id']}").status_code == 204
