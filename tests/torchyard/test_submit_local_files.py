"""`Client.submit` of a spec whose datasets are local files: each file is uploaded once
(asked for by sha256 first), the job names the ids and records where they came from,
and the user's file stays as it was."""

from __future__ import annotations

import json

import pytest

from tests.app.conftest import job_spec, npz_bytes
from tests.torchyard.conftest import new_token, uploads_seen
from tests.torchyard.local_specs import sources_of, write_local_spec
from torchyard import ApiError, Client, LocalSpecError
from torchyard.specs import is_dataset_id


def test_a_spec_of_local_files_uploads_each_once_and_a_resubmit_sends_no_dataset_bytes(
    server, api, tmp_path
):
    spec_path = write_local_spec(tmp_path)
    as_written = spec_path.read_bytes()
    before = uploads_seen(server)

    first = api.submit(spec_path)
    assert uploads_seen(server) - before == 2
    held = api.datasets.list()
    assert sorted(d["name"] for d in held) == ["train.npz", "val.npz"]

    second = api.submit(spec_path)
    assert uploads_seen(server) - before == 2  # not one more upload
    assert api.datasets.list() == held
    assert spec_path.read_bytes() == as_written  # the user's file is never written

    for job in (first, second):
        data = job.info["spec"]["data"]
        assert {data["train"], data["validation"]} == {d["id"] for d in held}
        assert job.refresh().info["dataset_sources"] == sources_of(tmp_path)
        assert job.status == "queued"


def test_a_spec_of_dataset_ids_still_works_and_records_no_sources(server, api, tmp_path):
    spec_path = write_local_spec(tmp_path)
    uploaded = api.datasets.upload(tmp_path / "data" / "train.npz")
    before = uploads_seen(server)
    job = api.submit(job_spec(uploaded["id"]))
    assert uploads_seen(server) == before
    assert job.info["spec"]["data"]["train"] == uploaded["id"]
    assert job.info["dataset_sources"] == {}
    # and the local spec finds that upload: only the validation file is new
    api.submit(spec_path)
    assert uploads_seen(server) - before == 1


def test_one_file_named_twice_is_uploaded_once(server, api, tmp_path):
    (tmp_path / "all.npz").write_bytes(npz_bytes())
    spec = job_spec("all.npz", data__validation="all.npz")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    before = uploads_seen(server)
    job = api.submit(tmp_path / "spec.json")
    assert uploads_seen(server) - before == 1
    data = job.info["spec"]["data"]
    assert data["train"] == data["validation"] and is_dataset_id(data["train"])


def test_a_dict_spec_reads_its_files_relative_to_the_working_directory(
    server, api, tmp_path, monkeypatch
):
    write_local_spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    spec = job_spec("data/train.npz")
    job = api.submit(spec)
    assert is_dataset_id(job.info["spec"]["data"]["train"])
    assert spec["data"]["train"] == "data/train.npz"  # the caller's dict is not changed
    assert job.info["dataset_sources"] == {"data.train": sources_of(tmp_path)["data.train"]}


def test_another_users_copy_of_the_same_bytes_is_neither_seen_nor_used(server, api, tmp_path):
    spec_path = write_local_spec(tmp_path)
    api.submit(spec_path)
    before = uploads_seen(server)
    with Client(server.url, new_token(server)) as stranger:
        job = stranger.submit(spec_path)
        assert uploads_seen(server) - before == 2  # uploaded again, as their own
        ids = {job.info["spec"]["data"]["train"], job.info["spec"]["data"]["validation"]}
        assert ids == {d["id"] for d in stranger.datasets.list()}
    assert not ids & {d["id"] for d in api.datasets.list()}


def test_a_missing_file_is_named_by_its_json_path_and_nothing_is_sent(server, api, tmp_path):
    spec_path = write_local_spec(tmp_path)
    spec = json.loads(spec_path.read_text())
    spec["data"]["validation"] = "data/missing.npz"
    spec["data"]["train"] = "notes.txt"
    spec_path.write_text(json.dumps(spec))
    before = uploads_seen(server)
    with pytest.raises(LocalSpecError) as caught:
        api.submit(spec_path)
    assert caught.value.path == "data.train"
    assert [issue.path for issue in caught.value.issues] == ["data.train", "data.validation"]
    assert "no such file 'data/missing.npz'" in caught.value.lines[1]
    assert uploads_seen(server) == before
    assert list(api.jobs()) == []


def test_a_bad_spec_is_an_api_error_carrying_the_detail_and_the_json_path(api, tmp_path):
    model = {"layers": [{"type": "linear", "out_features": "ten"}]}
    spec_path = write_local_spec(tmp_path, model=model)
    with pytest.raises(ApiError) as caught:
        api.submit(spec_path)
    error = caught.value
    assert error.status == 422
    assert error.path == "model.layers[0].out_features"
    assert error.detail[0]["path"] == "model.layers[0].out_features"
    assert error.lines[0].startswith("model.layers[0].out_features: expected an integer")
    with pytest.raises(ApiError) as again:
        api.validate(spec_path)
    assert again.value.path == "model.layers[0].out_features"


def test_validate_of_local_files_gives_the_summary(api, tmp_path):
    summary = api.validate(write_local_spec(tmp_path))
    assert summary["total_params"] == (4 * 8 + 8) + (8 * 3 + 3)


def test_an_unreadable_spec_file_is_one_line(api, tmp_path):
    (tmp_path / "broken.json").write_text('{"data": ')
    with pytest.raises(LocalSpecError) as caught:
        api.submit(tmp_path / "broken.json")
    assert "malformed JSON" in str(caught.value)
    with pytest.raises(LocalSpecError, match="cannot read"):
        api.submit(tmp_path / "absent.json")
