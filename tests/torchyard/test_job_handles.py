"""What a `Job` handle does against the real API: wait, metrics (lists and a DataFrame),
logs, download, cancel, and listing jobs page by page."""

from __future__ import annotations

import socket

import pytest

from tests.app.conftest import job_spec
from tests.torchyard.finished import WEIGHTS, finish
from tests.torchyard.local_specs import write_local_spec
from torchyard import ApiError, Client, Metrics, Unreachable


@pytest.fixture
def spec(tmp_path):
    return write_local_spec(tmp_path)


def test_wait_returns_the_job_as_it_ended(server, api, spec):
    job = api.submit(spec)
    finish(server, job.id)
    assert job.wait(timeout=30, poll_s=0.05) is job
    assert job.status == "succeeded" and job.done


def test_wait_gives_up_with_timeout_error_on_a_job_that_does_not_end(api, spec):
    job = api.submit(spec)
    with pytest.raises(TimeoutError, match=job.id):
        job.wait(timeout=0.3, poll_s=0.05)
    assert job.status == "queued"


def test_metrics_are_plain_lists_and_a_data_frame(server, api, spec):
    job = api.submit(spec)
    finish(server, job.id)
    history = job.metrics()
    assert isinstance(history, Metrics)
    assert history.series("loss") == ([0, 1, 2], [1.0, 0.5, 0.25])
    assert job.metrics(["loss"], max_points=4)["loss"][-1]["value"] == 0.25
    assert job.metrics(["loss"], since_step=1).series("loss")[0] == [2]
    pandas = pytest.importorskip("pandas")
    frame = history.to_pandas()
    assert isinstance(frame, pandas.DataFrame)
    assert list(frame.columns) == ["name", "step", "epoch", "value", "time"]
    assert frame.pivot(index="step", columns="name", values="value")["loss"].tolist() == [
        1.0,
        0.5,
        0.25,
    ]


def test_logs_and_checkpoints_of_a_finished_job(server, api, spec):
    job = api.submit(spec)
    finish(server, job.id)
    assert job.logs() == ["epoch 0 done"]
    assert [(c["kind"], c["epoch"]) for c in job.checkpoints()] == [("best", 0)]


def test_download_writes_the_best_weights_whole_or_not_at_all(server, api, spec, tmp_path):
    job = api.submit(spec)
    with pytest.raises(ApiError) as caught:
        job.download(tmp_path / "early.safetensors")  # nothing saved yet
    assert caught.value.status == 404
    assert not list(tmp_path.glob("*early*"))  # no half file, no temp file left
    finish(server, job.id)
    out = job.download(tmp_path / "out" / "best.safetensors")
    assert out.read_bytes() == WEIGHTS


def test_cancel_a_queued_job(api, spec):
    job = api.submit(spec)
    assert job.cancel().status == "cancelled"
    assert api.job(job.id).status == "cancelled"


def test_jobs_iterates_every_page_newest_first(api, spec):
    submitted = [api.submit(spec) for _ in range(5)]
    submitted[0].cancel()
    listed = [job.id for job in api.jobs(page_size=2)]
    assert listed == [job.id for job in reversed(submitted)]
    assert [job.id for job in api.jobs(status="cancelled")] == [submitted[0].id]


def test_errors_carry_the_servers_status_and_detail(api):
    with pytest.raises(ApiError) as caught:
        api.job("0" * 20)
    assert caught.value.status == 404
    assert caught.value.detail == f"no job {'0' * 20!r}"
    assert caught.value.path is None
    assert str(caught.value) == f"HTTP 404: no job {'0' * 20!r}"


def test_a_wrong_token_is_a_401_api_error(server):
    with Client(server.url, "not-a-token") as client, pytest.raises(ApiError) as caught:
        client.datasets.list()
    assert caught.value.status == 401


def test_a_service_that_is_not_there_is_unreachable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with Client(url, "t") as client, pytest.raises(Unreachable, match="cannot reach"):
            client.submit(job_spec("0" * 20))


def test_url_and_token_default_to_the_environment(server, token, monkeypatch):
    monkeypatch.setenv("TORCHYARD_URL", server.url + "/")
    monkeypatch.setenv("TORCHYARD_TOKEN", token)
    with Client() as client:
        assert client.url == server.url
        assert client.datasets.list() == []
