"""Checkpoint uploads cut short, by the client hanging up or by the API killed
mid-body: nothing half written is ever listed or served, and every download's
sha256 is the listed one. The uploads here speak the worker protocol directly
(docs/service.md), as a worker does, so they can stop at any byte.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import httpx

from tests.faults.conftest import Stack, checkpoints_of, spec_for
from tests.test_service_e2e import upload_digits, wait_for

BODY_BYTES = 4 << 20  # several of the API's 1 MiB write buffers


def _claim(stack: Stack, job_id: str) -> str:
    response = httpx.post(
        f"{stack.url}/api/v1/worker/jobs/{job_id}/claim",
        json={"worker": "test:1"},
        headers={"Authorization": f"Bearer {stack.worker_token}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()["token"]


def _put(stack: Stack, job_id: str, token: str, kind: str, epoch: int, body: bytes, sha=None):
    return httpx.put(
        f"{stack.url}/api/v1/worker/jobs/{job_id}/checkpoints/{kind}/{epoch}",
        content=body,
        headers={
            "Authorization": f"Bearer {token}",
            "X-Sha256": sha or hashlib.sha256(body).hexdigest(),
            "X-Step": str(10 * (epoch + 1)),
        },
        timeout=60,
    )


def _start_put(stack: Stack, job_id: str, token: str, body: bytes) -> socket.socket:
    """Send the headers and half the body of a PUT, then stop: an upload in flight."""
    sock = socket.create_connection(("127.0.0.1", stack.port))
    head = (
        f"PUT /api/v1/worker/jobs/{job_id}/checkpoints/last/0 HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"X-Sha256: {hashlib.sha256(body).hexdigest()}\r\nX-Step: 10\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def _partial_files(stack: Stack) -> list[Path]:
    return list((stack.artifacts / "tmp").glob("*.part"))


def _stored_files(stack: Stack, job_id: str) -> list[Path]:
    folder = stack.artifacts / "jobs" / job_id / "checkpoints"
    return sorted(p for p in folder.glob("*") if p.is_file()) if folder.exists() else []


def _nothing_served(stack: Stack, job_id: str) -> None:
    assert checkpoints_of(stack, job_id) == []
    assert stack.get(f"/jobs/{job_id}/checkpoints/best").status_code == 404
    assert _stored_files(stack, job_id) == []


def test_an_interrupted_upload_leaves_nothing_a_download_could_serve(
    fresh_database, private_redis, make_stack, examples_dir, tmp_path
):
    # a long lease: the claimed attempt must outlive an API restart
    stack = make_stack(fresh_database, private_redis.url, TORCHYARD_LEASE_S="120")
    stack.start_api()
    client = stack.client()
    train_id, val_id = upload_digits(client, examples_dir)
    job_id = client.submit(spec_for(train_id, val_id, epochs=1)).id
    token = _claim(stack, job_id)
    body = os.urandom(BODY_BYTES)

    # The client hangs up mid-body: the bytes went to a temp name, which is removed.
    sock = _start_put(stack, job_id, token, body)
    wait_for(lambda: _partial_files(stack), timeout=30)
    _nothing_served(stack, job_id)  # written under tmp/, never at a served path
    sock.close()
    wait_for(lambda: not _partial_files(stack), timeout=30)
    _nothing_served(stack, job_id)

    # The API is killed mid-body: a temp file may stay behind, but it is never served.
    sock = _start_put(stack, job_id, token, body)
    wait_for(lambda: _partial_files(stack), timeout=30)
    stack.kill_api()
    sock.close()
    stack.start_api()
    _nothing_served(stack, job_id)

    # A body that does not match its X-Sha256 is refused and not kept.
    wrong = _put(stack, job_id, token, "last", 0, body, sha=hashlib.sha256(b"x").hexdigest())
    assert wrong.status_code == 400, wrong.text
    _nothing_served(stack, job_id)

    # Complete uploads: retried ones store nothing twice; each download matches its listing.
    uploads = {("last", 0): body, ("best", 0): os.urandom(1 << 20), ("best", 1): os.urandom(999)}
    for (kind, epoch), data in uploads.items():
        for _ in range(2):  # a retry after a lost answer is the same PUT again
            response = _put(stack, job_id, token, kind, epoch, data)
            assert response.status_code == 201, response.text
    listed = checkpoints_of(stack, job_id)
    # the job keeps one best (save_top_k 1) and the newest last (app/retention.py)
    assert sorted((c["kind"], c["epoch"]) for c in listed) == [("best", 1), ("last", 0)]
    for checkpoint in listed:
        download = stack.get(f"/jobs/{job_id}/checkpoints/{checkpoint['id']}")
        assert hashlib.sha256(download.content).hexdigest() == checkpoint["sha256"]
        assert download.content == uploads[(checkpoint["kind"], checkpoint["epoch"])]
    best = stack.get(f"/jobs/{job_id}/checkpoints/best")
    assert best.content == uploads[("best", 1)]
    # and no file on disk is anything but a listed checkpoint
    on_disk = {hashlib.sha256(p.read_bytes()).hexdigest() for p in _stored_files(stack, job_id)}
    assert on_disk == {c["sha256"] for c in listed}
