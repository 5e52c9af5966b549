"""Dispatch over a real Redis broker (the deployed setup): send, queue depth, ping."""

from __future__ import annotations

import os
import secrets

import pytest

from app.dispatch import Dispatcher, celery_config, queue_for
from tests.app.conftest import job_spec
from worker.engine.spec import parse_spec

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture
def redis_dispatcher(tmp_path):
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Redis is required in CI: {exc}")
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    dispatcher = Dispatcher(REDIS_URL, tmp_path)
    queue = f"test-{secrets.token_hex(4)}"
    yield dispatcher, queue
    dispatcher.close()
    client.delete(queue)


def test_sends_reach_redis_and_the_depth_counts_them(redis_dispatcher):
    dispatcher, queue = redis_dispatcher
    assert dispatcher.queue_depth(queue) == 0  # a queue never used is empty, not an error
    assert dispatcher.send("job-a", queue) and dispatcher.send("job-b", queue)
    assert dispatcher.queue_depth(queue) == 2
    dispatcher.ping()


def test_an_unreachable_broker_fails_soft(tmp_path):
    from kombu.exceptions import OperationalError

    dispatcher = Dispatcher("redis://127.0.0.1:1/0", tmp_path)
    assert dispatcher.send("job", "cpu") is False
    assert dispatcher.queue_depth("cpu") is None
    with pytest.raises(OperationalError):
        dispatcher.ping()


def test_queue_follows_the_resources_and_the_device():
    def queue(**changes):
        return queue_for(parse_spec(job_spec("d", **changes)))

    assert queue() == "cpu"
    assert queue(resources={"gpus": 1}) == "gpu"
    assert queue(training__device="cuda:1") == "gpu"
    assert queue(training__device="cuda", resources={"gpus": 0}) == "cpu"


def test_device_auto_jobs_go_to_the_auto_queue_or_to_cpu_where_no_gpu_worker_waits():
    spec = parse_spec(job_spec("d", training__device="auto"))
    assert queue_for(spec) == "auto"
    assert queue_for(spec, gpu_first=False) == "cpu"
    gpu = parse_spec(job_spec("d", training__device="auto", resources={"gpus": 1}))
    assert queue_for(gpu, gpu_first=False) == "gpu"  # a job that asks for a GPU still gets one


def test_the_embedded_broker_folders_are_shared_by_sender_and_workers(tmp_path):
    options = celery_config("filesystem://", tmp_path)["broker_transport_options"]
    assert (
        options["data_folder_in"]
        == options["data_folder_out"]
        == str(tmp_path / "broker" / "queue")
    )
    assert (tmp_path / "broker" / "control").is_dir()
