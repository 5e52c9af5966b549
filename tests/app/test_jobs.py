"""Validate, submit, list and cancel jobs; dispatch puts a wake-up in the broker."""

from __future__ import annotations

import json

import pytest

from tests.app.conftest import job_spec, submit, upload


def test_validate_returns_the_summary_built_on_meta(user, dataset):
    response = user.post("/jobs/validate", json=job_spec(dataset["id"]))
    assert response.status_code == 200, response.text
    summary = response.json()["summary"]
    assert summary["total_params"] == 4 * 8 + 8 + 8 * 3 + 3
    assert user.get("/jobs").json()["jobs"] == []  # validating stores nothing


def test_submit_queues_the_job_and_sends_the_wakeup_to_the_cpu_queue(server, user, dataset):
    job = submit(user, job_spec(dataset["id"]))
    assert job["status"] == "queued"
    assert job["attempt"] == 1
    assert job["spec"]["data"]["train"] == dataset["id"]
    assert job["progress"] is None and job["metrics"] == {} and job["best"] is None
    [message] = server.sent_for(job["id"])
    assert message["task"] == "torchyard.run_job"
    assert message["queue"] == "cpu"


def test_gpu_jobs_go_to_the_gpu_queue(server, user, dataset):
    by_gpus = submit(user, job_spec(dataset["id"], resources={"gpus": 1}))
    by_device = submit(user, job_spec(dataset["id"], training__device="cuda"))
    assert [m["queue"] for m in server.sent_for(by_gpus["id"])] == ["gpu"]
    assert [m["queue"] for m in server.sent_for(by_device["id"])] == ["gpu"]


def test_bad_specs_are_422_with_paths(user, dataset):
    cases = {
        "training.epochs": job_spec(dataset["id"], training__epochs=0),
        "model.layers[0].type": job_spec(
            dataset["id"], model={"layers": [{"type": "nosuchlayer"}]}
        ),
        "data.train": job_spec("no-such-dataset"),
        "data.inputs": job_spec(dataset["id"], data__inputs="pixels"),
    }
    for path, spec in cases.items():
        for route in ("/jobs/validate", "/jobs"):
            response = user.post(route, json=spec)
            assert response.status_code == 422, (path, response.text)
            issues = response.json()["detail"]
            assert all(set(issue) == {"path", "message"} for issue in issues)
            assert path in [issue["path"] for issue in issues], (path, issues)
    assert user.get("/jobs").json()["jobs"] == []


def test_malformed_json_is_422_not_500(user):
    response = user.post(
        "/jobs", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "malformed JSON" in response.json()["detail"][0]["message"]
    response = user.post(
        "/jobs", content=b'{"lr": NaN}', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422


def test_spec_over_the_size_limit_is_413(make_server):
    small = make_server(max_spec_bytes=2_000)
    with small.new_user() as client:
        response = client.post("/jobs/validate", json={"name": "x" * 5_000})
    assert response.status_code == 413


def test_a_user_sees_only_their_own_datasets_by_id(server, user, dataset):
    with server.new_user() as other:
        response = other.post("/jobs", json=job_spec(dataset["id"]))
        assert response.status_code == 422
        assert response.json()["detail"][0]["path"] == "data.train"


def test_list_pages_newest_first_with_an_opaque_cursor(server, user, dataset):
    ids = [submit(user, job_spec(dataset["id"], name=f"job-{i}"))["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = user.get("/jobs", params=params).json()
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert user.get("/jobs", params={"cursor": "%%%"}).status_code == 422


def test_list_filters_by_status(user, dataset):
    kept = submit(user, job_spec(dataset["id"]))
    gone = submit(user, job_spec(dataset["id"]))
    user.post(f"/jobs/{gone['id']}/cancel")
    assert [j["id"] for j in user.get("/jobs", params={"status": "queued"}).json()["jobs"]] == [
        kept["id"]
    ]
    assert [j["id"] for j in user.get("/jobs", params={"status": "cancelled"}).json()["jobs"]] == [
        gone["id"]
    ]
    assert user.get("/jobs", params={"status": "bogus"}).status_code == 422


def test_cancel_a_queued_job_cancels_it_at_once(user, queued_job):
    response = user.post(f"/jobs/{queued_job['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    job = user.get(f"/jobs/{queued_job['id']}").json()
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    # cancelling again changes nothing
    assert user.post(f"/jobs/{queued_job['id']}/cancel").status_code == 202


def test_validation_dataset_fields_are_checked_too(user, dataset):
    other = upload(user, None, "val.npz")
    assert (
        user.post(
            "/jobs/validate", json=job_spec(dataset["id"], data__validation=other["id"])
        ).status_code
        == 200
    )
    from tests.app.conftest import npz_bytes

    wide = upload(user, npz_bytes(features=7), "wide.npz")
    response = user.post(
        "/jobs/validate", json=job_spec(dataset["id"], data__validation=wide["id"])
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["path"] == "data.validation"


def test_dataset_sources_are_kept_beside_the_spec_and_shown(user, dataset):
    sources = {"data.train": "/home/ana/données/train.npz"}
    header = {"X-Dataset-Sources": json.dumps(sources)}  # ASCII: é travels as \u00e9
    response = user.post("/jobs", json=job_spec(dataset["id"]), headers=header)
    assert response.status_code == 201, response.text
    job = user.get(f"/jobs/{response.json()['id']}").json()
    assert job["dataset_sources"] == sources
    assert job["spec"]["data"]["train"] == dataset["id"]  # the spec stays the engine's spec
    assert "sources" not in json.dumps(job["spec"])
    plain = submit(user, job_spec(dataset["id"]))
    assert user.get(f"/jobs/{plain['id']}").json()["dataset_sources"] == {}


@pytest.mark.parametrize(
    "header, expected",
    [
        ("not json", "not JSON"),
        ('["a.npz"]', "expected a JSON object"),
        ('{"data.validation": "v.npz"}', "'data.validation' names no dataset of this spec"),
        ('{"data.train": 7}', "data.train: expected a path of 1 to 1024 characters"),
        ('{"data.train": ""}', "data.train: expected a path of 1 to 1024 characters"),
    ],
)
def test_bad_dataset_sources_are_422_naming_the_header(user, dataset, header, expected):
    response = user.post(
        "/jobs", json=job_spec(dataset["id"]), headers={"X-Dataset-Sources": header}
    )
    assert response.status_code == 422, response.text
    [issue] = response.json()["detail"]
    assert issue["path"] == "header.X-Dataset-Sources"
    assert issue["message"].startswith(expected), issue
