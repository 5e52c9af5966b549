"""Hostile and broken dataset uploads: a clear 4xx naming the file and what is wrong, or
(for bad values in a column, which are only read when a job uses them) a job that
fails with a one-line reason. Nothing is ever unpickled, inflated past its limit, or
written outside the artifact root. Every refusal is asserted for both bodies an upload
can have, a multipart form and the raw bytes (application/octet-stream, ?name=): the
same status and the same words.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from tests.app.conftest import Server, job_spec, npz_bytes, server_settings, submit, upload


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def post_raw(client, filename: str, data: bytes):
    headers = {"Content-Type": "application/octet-stream"}
    return client.post("/datasets", params={"name": filename}, content=data, headers=headers)


def refused(client, filename: str, data: bytes, status: int = 422) -> str:
    """The refusal's detail, the same for the file sent as a form and as raw bytes."""
    details = []
    for response in (
        client.post("/datasets", files={"file": (filename, data)}),
        post_raw(client, filename, data),
    ):
        assert response.status_code == status, (filename, response.status_code, response.text[:300])
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail and "\n" not in detail
        details.append(detail)
    form, raw = details
    if status == 413 and form.startswith("request body of "):
        # refused from Content-Length: the form's is longer by its part headers
        assert (
            raw.startswith("request body of ")
            and raw.split(" bytes ")[1:] == form.split(" bytes ")[1:]
        )
    else:
        assert raw == form
    return form


def snapshot(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def assert_nothing_stored(client, server: Server) -> None:
    assert client.get("/datasets").json() == []
    root = server.settings.artifact_dir
    assert not list((root / "tmp").iterdir()), "a temp file was left behind"


def test_a_file_over_the_upload_limit_is_413_naming_the_limit(make_server):
    small = make_server(max_upload_bytes=10_000)
    with small.new_user() as client:
        # over the file limit, under the body limit (file limit + multipart overhead): cut while streaming
        detail = refused(client, "big.npz", npz_bytes(rows=400), status=413)
        assert detail == "upload exceeds the limit of 10,000 bytes"
        # far over: refused from Content-Length before a byte is read
        big = npz_bytes(rows=4_000)
        detail = refused(client, "bigger.npz", big, status=413)
        assert (
            detail.startswith("request body of ") and "exceeds the limit of 75,536 bytes" in detail
        )
        assert_nothing_stored(client, small)


def test_truncated_and_corrupted_npz_files_are_422_naming_the_file(server, user):
    good = npz_bytes()
    assert refused(user, "cut.npz", good[: len(good) // 2]) == (
        "cut.npz: not a valid NPZ file (File is not a zip file)"
    )
    flipped = bytearray(good)
    flipped[400:420] = b"\xff" * 20  # inside x's data: the CRC no longer matches
    assert refused(user, "flipped.npz", bytes(flipped)) == (
        "flipped.npz: not a valid NPZ file (Bad CRC-32 for file 'x.npy')"
    )
    assert refused(user, "junk.npy", b"\x93NUMPY junk") == (
        "junk.npy: not a valid NPY file (unknown .npy format version 32)"
    )
    assert refused(user, "junk.parquet", b"PAR1 junk PAR1").startswith(
        "junk.parquet: not a valid Parquet file"
    )
    assert_nothing_stored(user, server)


class RunsOnUnpickle:
    """An object whose unpickling makes a folder: proof of whether anything unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_object_arrays_are_refused_and_never_unpickled(server, user, tmp_path):
    marker = tmp_path / "unpickled"
    evil = np.array([RunsOnUnpickle(marker)], dtype=object)
    npy = io.BytesIO()
    np.save(npy, evil)
    for filename, data in (
        ("evil.npz", npz(x=evil, y=np.zeros(1))),
        ("evil.npy", npy.getvalue()),
    ):
        assert refused(user, filename, data) == (
            f"{filename}: holds Python objects (pickle), which torchyard refuses"
        )
    assert not marker.exists()
    assert_nothing_stored(user, server)


def test_a_zip_bomb_is_refused_from_its_index_before_it_is_inflated(server, user):
    # a member whose .npy header claims 8 TiB, in a 200-byte file
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<i8", "fortran_order": False, "shape": (2**40,)}
    )
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bomb:
        bomb.writestr("y.npy", header.getvalue() + bytes(64))
    assert refused(user, "bomb.npz", archive.getvalue()) == (
        "bomb.npz: arrays hold 8,796,093,022,208 bytes, over the limit of 8,589,934,592 bytes"
    )
    assert_nothing_stored(user, server)


def test_the_unpacked_size_limit_is_configurable(make_server):
    strict = make_server(max_unpacked_bytes=1 << 20)
    archive = io.BytesIO()
    np.savez_compressed(archive, x=np.zeros((2**20, 4), np.float32), y=np.zeros(2**20, np.int64))
    assert len(archive.getvalue()) < 100_000  # 24 MiB of zeros
    with strict.new_user() as client:
        detail = refused(client, "zeros.npz", archive.getvalue())
        assert detail == (
            "zeros.npz: members unpack to 25,166,080 bytes, over the limit of 1,048,576 bytes"
        )
        assert_nothing_stored(client, strict)


def test_csv_with_ragged_rows_is_422_naming_the_line(server, user):
    assert refused(user, "ragged.csv", b"a,b,y\n1,2,0\n3,4\n5,6,1\n") == (
        "ragged.csv: line 3 has 2 values; the header has 3 columns"
    )
    assert refused(user, "latin1.csv", "é,y\n1,2\n".encode("latin-1")).startswith(
        "latin1.csv: not a valid CSV file ('utf-8' codec can't decode"
    )
    assert_nothing_stored(user, server)


def test_text_where_numbers_belong_is_refused_when_a_spec_uses_it(user):
    # a text column is a field like any other until a spec feeds it to the model
    table = upload(user, b"a,b,y\n1,2,0\nhello,3,1\n4,5,2\n", "mixed.csv")
    assert table["fields"]["a"]["dtype"] == "str"
    response = user.post("/jobs", json=job_spec(table["id"], data__inputs=["a", "b"]))
    assert response.status_code == 422
    [issue] = response.json()["detail"]
    assert issue == {"path": "data.inputs[0]", "message": "field 'a' holds text, not numbers"}
    words = upload(user, npz(x=np.array([["a", "b"]] * 4), y=np.zeros(4, np.int64)), "words.npz")
    response = user.post("/jobs", json=job_spec(words["id"]))
    assert response.status_code == 422
    assert response.json()["detail"][0]["path"] == "data.inputs"
    assert "not numbers" in response.json()["detail"][0]["message"]


def test_empty_files_are_422_for_every_format(server, user):
    for suffix in ("npz", "npy", "csv", "parquet"):
        assert refused(user, f"empty.{suffix}", b"") == f"empty.{suffix}: file is empty"
    assert refused(user, "header.csv", b"a,b\n") == "header.csv: has no rows"
    assert refused(user, "scalar.npz", npz(x=np.float32(1))) == (
        "scalar.npz: holds no arrays or columns"
    )
    assert_nothing_stored(user, server)


def test_a_file_named_like_a_path_never_becomes_one(server, user):
    base = server.settings.home.parent
    root = server.settings.artifact_dir.resolve()
    before = snapshot(base)
    assert refused(user, "../../etc/passwd", npz_bytes()) == (
        "'passwd' is not a dataset file: expected one of .npz, .npy, .csv, .parquet"
    )
    names = {
        "../../etc/passwd.npz": "passwd.npz",
        "/etc/passwd.npz": "passwd.npz",
        "..\\..\\windows\\system32\\x.npz": "x.npz",
        "C:\\Users\\x\\train.npz": "train.npz",
        "..%2f..%2fetc%2fpasswd.npz": "..%2f..%2fetc%2fpasswd.npz",
    }
    for filename, shown in names.items():
        for body in (
            upload(user, npz_bytes(), filename),
            post_raw(user, filename, npz_bytes()).json(),
        ):
            assert body["name"] == shown
            assert (root / "datasets" / body["id"] / "data.npz").is_file()
    new = snapshot(base) - before
    outside = [p for p in new if not p.resolve().is_relative_to(root)]
    # the database and its journal may grow; nothing else may appear outside the artifact root
    assert all(p.name.startswith("torchyard.db") for p in outside), outside
    assert all(p.parent.name.isalnum() and p.name == "data.npz" for p in new - set(outside))


def test_a_multipart_body_without_a_file_is_422_naming_the_field(user):
    response = user.post("/datasets", files={"other": ("x.npz", npz_bytes())})
    assert response.status_code == 422
    assert response.json()["detail"] == [{"path": "body.file", "message": "Field required"}]
    # raw bytes without ?name=: nothing says what the file is
    response = user.post(
        "/datasets", content=b"raw", headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 422
    [issue] = response.json()["detail"]
    assert issue["path"] == "query.name"
    assert issue["message"].startswith("Field required (the file's name, e.g. ?name=train.npz")
    # neither a form nor raw bytes
    response = user.post("/datasets", params={"name": "x.npz"}, json={"file": "x"})
    assert response.status_code == 422
    [issue] = response.json()["detail"]
    assert issue["path"] == "body.file"
    assert "application/octet-stream with ?name=" in issue["message"]


def test_nan_and_inf_in_data_fail_the_job_with_a_one_line_reason(tmp_path):
    """NaN/Inf are values, read only when a job loads the field: the real worker claims the
    job over HTTP, trains in its child process, and the job ends `failed` naming field and row.
    """
    from worker.settings import WorkerSettings
    from worker.task import run_claimed_job

    srv = Server(server_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'torchyard.db'}"))
    try:
        with srv.new_user() as client:
            x = np.ones((32, 4), np.float32)
            x[5, 2] = np.nan
            x[9, 0] = np.inf
            dataset = upload(client, npz(x=x, y=np.zeros(32, np.int64)), "nan.npz")
            job = submit(client, job_spec(dataset["id"], training__epochs=1))
            settings = WorkerSettings(
                api_url=srv.url,
                worker_token=srv.settings.worker_token or "",
                work_dir=tmp_path / "worker",
            )
            assert run_claimed_job(job["id"], settings) == "failed"
            done = client.get(f"/jobs/{job['id']}").json()
    finally:
        srv.stop()
    assert done["status"] == "failed"
    assert done["error"].endswith(": field 'x' has NaN/Inf at row 5")
    assert "\n" not in done["error"]
