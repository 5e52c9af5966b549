"""Datasets over real HTTP: upload, describe, list, read, delete, limits and bad files."""

from __future__ import annotations

import hashlib

from tests.app.conftest import job_spec, npz_bytes, submit, upload


def test_upload_describes_the_file_and_lists_it(server, user):
    data = npz_bytes(rows=50, features=4, classes=3)
    body = upload(user, data, "train.npz")
    assert body["name"] == "train.npz"
    assert body["format"] == "npz"
    assert body["rows"] == 50
    assert body["size"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["fields"]["x"]["shape"] == [4]
    assert body["fields"]["x"]["dtype"] == "float32"
    assert body["fields"]["y"]["shape"] == []
    assert body["fields"]["y"]["dtype"] == "int64"

    assert [d["id"] for d in user.get("/datasets").json()] == [body["id"]]
    assert user.get(f"/datasets/{body['id']}").json() == body


def test_upload_over_the_limit_is_413_and_leaves_no_file(make_server):
    small = make_server(max_upload_bytes=10_000)
    with small.new_user() as client:
        response = client.post("/datasets", files={"file": ("big.npz", npz_bytes(rows=2_000))})
        assert response.status_code == 413
        assert "limit" in response.json()["detail"]
        assert client.get("/datasets").json() == []
    stored = small.settings.artifact_dir
    assert not list((stored / "datasets").glob("*/*")) if (stored / "datasets").exists() else True
    assert not list((stored / "tmp").iterdir())


def test_bad_files_are_422_with_one_line(user):
    cases = {
        "notes.txt": b"hello",
        "broken.npz": b"PK\x03\x04 this is not a zip archive",
        "empty.csv": b"",
    }
    for filename, data in cases.items():
        response = user.post("/datasets", files={"file": (filename, data)})
        assert response.status_code == 422, (filename, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and detail
    assert user.get("/datasets").json() == []


def test_a_path_in_the_filename_is_only_a_display_name(server, user, tmp_path):
    body = upload(user, npz_bytes(), "../../../etc/passwd.npz")
    assert body["name"] == "passwd.npz"
    root = server.settings.artifact_dir.resolve()
    stored = list(root.rglob("*.npz"))
    assert any(p.parent.name == body["id"] for p in stored)
    assert all(p.resolve().is_relative_to(root) for p in stored)
    assert not (root.parent.parent / "etc").exists()
    # and without a dataset suffix it is refused, with nothing written
    response = user.post("/datasets", files={"file": ("../../etc/passwd", npz_bytes())})
    assert response.status_code == 422


def test_delete_is_409_while_a_queued_job_uses_the_dataset(user):
    dataset = upload(user)
    job = submit(user, job_spec(dataset["id"]))
    response = user.delete(f"/datasets/{dataset['id']}")
    assert response.status_code == 409
    assert job["id"] in response.json()["detail"]

    assert user.post(f"/jobs/{job['id']}/cancel").status_code == 202
    assert user.delete(f"/datasets/{dataset['id']}").status_code == 204
    assert user.get(f"/datasets/{dataset['id']}").status_code == 404


def test_delete_removes_the_file(server, user):
    dataset = upload(user)
    folder = server.settings.artifact_dir / "datasets" / dataset["id"]
    assert folder.exists()
    assert user.delete(f"/datasets/{dataset['id']}").status_code == 204
    assert not folder.exists()
    assert user.delete(f"/datasets/{dataset['id']}").status_code == 404


def multipart(filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "torchyardtestboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def test_a_streamed_upload_without_length_is_cut_off_at_the_limit(make_server):
    small = make_server(max_upload_bytes=10_000)
    with small.new_user() as client:
        for size in (10_500, 500_000):  # just over the file limit; far over the body limit
            body, content_type = multipart("big.npz", b"x" * size)

            def chunks(body=body):
                for i in range(0, len(body), 4096):
                    yield body[i : i + 4096]

            response = client.post(
                "/datasets", content=chunks(), headers={"Content-Type": content_type}
            )
            assert response.status_code == 413, (size, response.text)
        assert client.get("/datasets").json() == []
    assert not list((small.settings.artifact_dir / "tmp").iterdir())


def test_list_by_sha256_finds_only_the_users_own_copies_of_those_bytes(server, user):
    data = npz_bytes(rows=33, seed=7)
    digest = hashlib.sha256(data).hexdigest()
    mine = upload(user, data, "mine.npz")
    upload(user, npz_bytes(rows=34, seed=7), "other.npz")
    with server.new_user() as stranger:
        theirs = upload(stranger, data, "same-bytes.npz")
        # another user's copy of the same bytes is never revealed, nor reused
        assert [d["id"] for d in stranger.get("/datasets", params={"sha256": digest}).json()] == [
            theirs["id"]
        ]
    found = user.get("/datasets", params={"sha256": digest.upper()}).json()
    assert [d["id"] for d in found] == [mine["id"]]
    assert user.get("/datasets", params={"sha256": "0" * 64}).json() == []


def test_list_by_a_malformed_sha256_is_422_naming_the_parameter(user):
    response = user.get("/datasets", params={"sha256": "not-a-digest"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["path"] == "query.sha256"


def test_a_raw_upload_is_the_same_dataset_as_the_same_file_in_a_form(server, user):
    """The raw bytes (application/octet-stream, the name in ?name=) skip the multipart parser;
    what is stored and described is the same, byte for byte."""
    data = npz_bytes(rows=300, features=8, classes=5)
    form = upload(user, data, "train.npz")
    response = user.post(
        "/datasets",
        params={"name": "train.npz"},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    raw = response.json()
    assert raw["id"] != form["id"]
    same = ("name", "format", "rows", "size", "sha256", "fields")
    assert {k: raw[k] for k in same} == {k: form[k] for k in same}
    assert raw["sha256"] == hashlib.sha256(data).hexdigest()
    root = server.settings.artifact_dir
    assert (root / "datasets" / raw["id"] / "data.npz").read_bytes() == data
    # the name's suffix says the format, as a form's file name does
    csv = b"a,b,y\n1,2,0\n3,4,1\n"
    response = user.post(
        "/datasets",
        params={"name": "table.csv"},
        content=csv,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "csv"
    assert response.json()["rows"] == 2
