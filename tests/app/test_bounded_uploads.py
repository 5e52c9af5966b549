"""Uploads are inspected with bounded work and memory, and a client that hangs up is not
an error: proved against the API as its own uvicorn process, whose log and peak RSS
(/proc) the tests read. Bounds are asserted on what the process did (members and
columns counted before a parser ran, memory), never on time.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.app.api_process import ApiProcess
from tests.app.hostile_files import deflated_zeros, many_members, npy_header, stored, wide_csv
from tests.app.hostile_files import zip_archive as build_zip
from torchyard import Client

MIB = 1 << 20
SCAN_BUDGET = 513 * MIB  # the labels and two members of 256 MiB


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    proc = ApiProcess(tmp_path_factory.mktemp("bounded"), max_class_scan_bytes=str(SCAN_BUDGET))
    yield proc
    proc.stop()


def post_file(api: ApiProcess, filename: str, data: bytes) -> tuple[int, dict, int]:
    """Upload; the status, the answer and the API's memory growth past its RSS before."""
    before = api.reset_peak()
    with api.client() as client:
        response = client.post("/datasets", files={"file": (filename, data)})
    return response.status_code, response.json(), api.peak() - before


def test_an_npz_of_400000_members_is_422_from_its_end_record(api):
    # zipfile alone needs ~7 s and ~250 MB to read this index; it never gets to
    data = many_members(400_000)
    status, body, grew = post_file(api, "many.npz", data)
    assert status == 422, body
    assert body["detail"] == "many.npz: holds 400,000 members, over the limit of 10,000"
    assert grew < 64 * MIB, grew
    assert not api.temp_files()


def test_a_csv_header_of_238000_columns_is_422_before_pyarrow_reads_it(api):
    status, body, grew = post_file(api, "wide.csv", wide_csv(238_000))
    assert status == 422, body
    assert body["detail"] == "wide.csv: the header has 238,000 columns, over the limit of 10,000"
    assert grew < 64 * MIB, grew
    # one header line of 20 MB: refused after reading at most the header allowance
    status, body, _ = post_file(api, "line.csv", b"a" * (20 * MIB))
    assert status == 422, body
    assert body["detail"] == (
        "line.csv: the header line is longer than 10,305,536 bytes (room for 10,000 columns)"
    )


def test_an_npz_inflating_to_gigabytes_is_described_in_chunks_within_its_budget(api):
    """Three int64 members of 256 MiB of zeros (a few KiB each on the wire), and labels.

    Classes are counted smallest field first until SCAN_BUDGET (513 MiB) is spent: the
    labels and two members are read, in chunks (the API grows by far less than one
    member), the third is described without num_classes.
    """
    rows = 256 * MIB // 8
    labels = np.array([0, 2, 1, 2], np.int64)
    members = [
        stored("y.npy", npy_header("<i8", (4,)) + labels.tobytes()),
        *(deflated_zeros(f"m{i}.npy", "<i8", rows) for i in range(3)),
    ]
    data = build_zip(members)
    assert len(data) < 2 * MIB
    status, body, grew = post_file(api, "zeros.npz", data)
    assert status == 201, body
    fields = body["fields"]
    assert fields["y"]["num_classes"] == 3
    counted = sorted(fields[f"m{i}"]["num_classes"] is not None for i in range(3))
    assert counted == [False, True, True]
    assert all(fields[f"m{i}"]["num_classes"] in (None, 1) for i in range(3))
    assert grew < 96 * MIB, grew  # reading a member whole would add 256 MiB


def test_a_csv_is_typed_block_by_block_as_a_whole_file_read_would_type_it(api):
    """A 28 MB CSV, read in 16 MiB blocks: a column of integers that shows a 0.5 in its
    last row is float64 (pyarrow's streaming reader would have fixed it as int64 from
    the first block and failed), and the integer column's classes come from every block."""
    cycle = "".join(f"{i},{i * 1000}\n" for i in range(7))
    body = "y,x\n" + cycle * 500_000 + "3,0.5\n"
    assert len(body) > 16 * MIB
    status, answer, _ = post_file(api, "big.csv", body.encode())
    assert status == 201, answer
    assert answer["rows"] == 3_500_001
    assert answer["fields"]["y"] == {"shape": [], "dtype": "int64", "num_classes": 7}
    assert answer["fields"]["x"] == {"shape": [], "dtype": "float64", "num_classes": None}


def test_a_100_mb_upload_is_stored_byte_for_byte_in_bounded_memory_both_ways(api, tmp_path):
    """Raw bytes (what torchyard's client sends) and a multipart form: each is written a
    few MiB at a time, hashed as it goes, synced and dropped from the page cache every
    64 MiB; the stored file is the sent one and the API grows by far less than it."""
    path = tmp_path / "big.npz"
    rng = np.random.default_rng(1)
    rows = 200_000
    np.savez(path, x=rng.normal(size=(rows, 128)).astype(np.float32), y=np.arange(rows) % 7)
    data = path.read_bytes()
    assert len(data) > 100e6
    digest = hashlib.sha256(data).hexdigest()
    del data

    before = api.reset_peak()
    with Client(api.url, api.token) as client:
        raw = client.datasets.upload(path, name="raw.npz")
    raw_grew = api.peak() - before
    before = api.reset_peak()
    with api.client() as client, path.open("rb") as handle:
        response = client.post("/datasets", files={"file": ("form.npz", handle)})
    form_grew = api.peak() - before
    assert response.status_code == 201, response.text
    form = response.json()

    for body in (raw, form):
        assert body["sha256"] == digest
        assert body["rows"] == rows
        assert body["fields"]["y"]["num_classes"] == 7
        stored = Path(api.home, "artifacts", "datasets", body["id"], "data.npz")
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
    assert raw_grew < 64 * MIB, raw_grew
    assert form_grew < 64 * MIB, form_grew
    assert not api.temp_files()


# ------------------------------------------------------------- hang-ups


def _request(api: ApiProcess, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.port))
    sock.sendall(f"{head}\r\nHost: test\r\nAuthorization: Bearer {api.token}\r\n".encode() + body)
    return sock


def _hang_up(sock: socket.socket) -> None:
    time.sleep(0.05)  # let the API start on the request
    sock.close()


def dropped_connections(api: ApiProcess) -> Iterator[socket.socket]:
    boundary = "b0undary"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n\r\n'
    ).encode()
    # an upload cut off after 2 MiB of a declared 50 MB (bytes already in the store's tmp/)
    yield _request(
        api,
        "POST /api/v1/datasets HTTP/1.1",
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: 50000000\r\n\r\n".encode()
        + part
        + bytes(2 * MIB),
    )
    # the same as raw bytes
    yield _request(
        api,
        "POST /api/v1/datasets?name=a.npz HTTP/1.1",
        b"Content-Type: application/octet-stream\r\nContent-Length: 50000000\r\n\r\n"
        + bytes(2 * MIB),
    )
    # a job spec cut off mid-JSON
    yield _request(
        api,
        "POST /api/v1/jobs HTTP/1.1",
        b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"name": ',
    )
    # a chunked body with a chunk size that is not hex
    yield _request(
        api,
        "POST /api/v1/jobs HTTP/1.1",
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"a":\r\nzz\r\n1\r\n',
    )
    # a slow client: headers only, then a byte a while, then gone
    sock = _request(
        api,
        "POST /api/v1/jobs HTTP/1.1",
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n",
    )
    for _ in range(3):
        time.sleep(0.05)
        sock.sendall(b" ")
    yield sock


def test_a_client_that_hangs_up_mid_request_is_one_info_line_not_an_error(api):
    start = len(api.log())
    connections = 0
    for _ in range(10):
        for sock in dropped_connections(api):
            _hang_up(sock)
            connections += 1
    time.sleep(1)  # the API notices the last hang-ups
    with api.client() as client:
        assert client.get("/datasets").status_code == 200  # still serving
    log = api.log()[start:]
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith(("ERROR", "CRITICAL"))], log[:3000]
    assert "Traceback" not in log, log[:3000]
    gone = [line for line in lines if "client went away" in line]
    assert all(line.startswith("INFO app.api.errors ") for line in gone), gone[:3]
    assert 0 < len(gone) <= connections
    # uvicorn's own word for the chunk that is no chunk: a warning, one line each
    assert len(lines) <= 2 * connections
    assert not api.temp_files()  # the cut-off upload's bytes went with it


def test_the_log_of_a_refused_upload_is_quiet(api: ApiProcess):
    start = len(api.log())
    with api.client() as client:
        response = client.post("/datasets", files={"file": ("x.txt", b"hello")})
    assert response.status_code == 422
    assert api.log()[start:].strip() == ""
