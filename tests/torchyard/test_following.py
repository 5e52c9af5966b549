"""Following a job's events with `torchyard.Client` against the real API over real HTTP:
every event once, in order, across a dropped connection (Last-Event-ID)."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading

import pytest

import torchyard.events
from tests.app.conftest import Server, claim, job_spec, npz_bytes, points
from torchyard import ApiError, Client, Job, Unreachable

# Each a line break to str.splitlines(), none to SSE (which breaks at CR and LF only).
ODD_LINE = "loss\u2028ok\x85next\x1cfield\u2029end"


def finished_job(server: Server, api: Client, dataset_id: str) -> str:
    """A job with every kind of event: status, metrics, log, checkpoint, end."""
    job_id = api.submit(job_spec(dataset_id)).id
    attempt = claim(server, job_id)
    attempt.post("metrics", {"points": points(1.0, 0.5)})
    attempt.post("logs", {"lines": ["epoch 0 done", ODD_LINE]})
    weights = b"w" * 100
    headers = {"X-Sha256": hashlib.sha256(weights).hexdigest(), "X-Step": "2"}
    attempt.client.put(
        f"/worker/jobs/{job_id}/checkpoints/best/0", content=weights, headers=headers
    )
    attempt.post("finish", {"status": "succeeded", "result": {"best_epoch": 0}})
    return job_id


@pytest.fixture
def dataset_id(api: Client, tmp_path) -> str:
    path = tmp_path / "train.npz"
    path.write_bytes(npz_bytes())
    return api.datasets.upload(path)["id"]


def test_events_give_id_name_and_data_of_each_event_until_end(server, api, dataset_id):
    job_id = finished_job(server, api, dataset_id)
    events = list(api.job(job_id).follow())
    assert [kind for _, kind, _ in events] == [
        "status",
        "status",
        "metrics",
        "log",
        "checkpoint",
        "status",
        "end",
    ]
    ids = [int(event_id) for event_id, _, _ in events]
    assert ids == sorted(set(ids))
    assert [p["value"] for p in events[2][2]["points"]] == [1.0, 0.5]
    # a log line with characters str.splitlines() breaks at stays one line of one event
    assert events[3][2] == {"lines": ["epoch 0 done", ODD_LINE]}
    assert events[-1][2]["status"] == "succeeded"
    # resuming after an event gives exactly the rest
    assert list(api.job(job_id).follow(last_event_id=events[3].id)) == events[4:]


class CuttingProxy:
    """A TCP proxy to the API that cuts its first connection mid-answer, right after the
    `cut_after`-th event frame: a network drop in the middle of an event stream."""

    def __init__(self, upstream: str, cut_after: int):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            up = socket.create_connection(self.upstream)
            cut = self.cut_after if self.connections == 1 else None
            threading.Thread(target=self._pump, args=(down, up, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, cut), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, cut: int | None) -> None:
        seen = b""
        try:
            while chunk := source.recv(65536):
                if cut is not None:
                    seen += chunk
                    ends = [i for i in range(len(seen)) if seen.startswith(b"\n\n", i)]
                    if len(ends) >= cut:
                        # send up to the end of that frame, then drop both sides
                        sink.sendall(chunk[: len(chunk) - (len(seen) - ends[cut - 1] - 2)])
                        break
                sink.sendall(chunk)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_a_dropped_event_stream_resumes_with_last_event_id_losing_and_repeating_nothing(
    server, api, token, dataset_id
):
    job_id = finished_job(server, api, dataset_id)
    whole = list(api.job(job_id).follow())
    proxy = CuttingProxy(server.url, cut_after=3)
    try:
        with Client(proxy.url, token) as resumed:
            job = resumed.job(job_id)  # its own connection, not cut
            proxy.connections = 0
            got = list(job.follow())
    finally:
        proxy.close()
    assert proxy.connections == 2  # it was cut, and reopened once
    assert got == whole


def test_events_of_a_missing_job_are_a_404_at_once_not_retried(api):
    job = Job(api, {"id": "no-such-job", "status": "queued"})  # a handle on a job now gone
    with pytest.raises(ApiError) as caught:
        list(job.follow())
    assert caught.value.status == 404
    assert caught.value.lines == ["no job 'no-such-job'"]


def test_events_give_up_with_a_clear_error_when_the_api_is_gone(monkeypatch):
    monkeypatch.setattr(torchyard.events, "GIVE_UP_S", 0.5)
    monkeypatch.setattr(torchyard.events, "RECONNECT_S", 0.1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused
        with Client(url, "t") as gone:
            job = Job(gone, {"id": "some-job", "status": "running"})
            with pytest.raises(Unreachable) as caught:
                list(job.follow())
    assert str(caught.value).startswith("lost the event stream of job some-job:")
