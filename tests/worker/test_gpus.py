"""Which GPUs a worker holds, what its training children see, and which jobs it takes.

All of it is decided before CUDA starts, so a CPU machine checks it; that the GPUs
then really train is bench/gpu_check.py's part, on a lent GPU machine.
"""

from __future__ import annotations

import pytest

from worker.gpus import _runs_on, gpus_for_workers, parse_gpu_set, worker_environment
from worker.settings import gpu_queue, gpus_of_queue, worker_queues


@pytest.mark.parametrize(
    ("text", "gpus"), [("0", [0]), ("3", [3]), ("0,1", [0, 1]), (" 2, 3 ", [2, 3])]
)
def test_a_gpu_or_a_set_of_them(text, gpus):
    assert parse_gpu_set(text) == gpus


@pytest.mark.parametrize(
    ("text", "why"),
    [
        *[(text, "a GPU index") for text in ("", "-1", "0,", "a", "1.5")],
        *[(text, "named twice") for text in ("0,0", "1, 1")],
    ],
)
def test_a_bad_gpu_set_says_why(text, why):
    with pytest.raises(ValueError, match=why):
        parse_gpu_set(text)


def test_serve_hands_each_worker_a_whole_set_and_the_rest_train_on_the_cpu():
    assert gpus_for_workers(3, gpus=2) == [[0], [1], []]
    assert gpus_for_workers(2, gpus=4, per_worker=2) == [[0, 1], [2, 3]]
    assert gpus_for_workers(3, gpus=5, per_worker=2) == [[0, 1], [2, 3], []]
    assert gpus_for_workers(2, gpus=0) == [[], []]


def test_the_worker_and_its_children_see_only_its_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = worker_environment([2, 3])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["TORCHYARD_GPU"] == "2,3"
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "CUDA_VISIBLE_DEVICES" not in worker_environment([])


def test_gpu_indices_count_the_gpus_this_process_was_given(monkeypatch):
    # a container (or a scheduler) gave this process physical GPUs 4 to 7
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert worker_environment([1, 2])["CUDA_VISIBLE_DEVICES"] == "5,6"
    assert worker_environment([0])["CUDA_VISIBLE_DEVICES"] == "4"
    # one past what it was given: none, so the start check names the missing GPU
    assert worker_environment([3, 4])["CUDA_VISIBLE_DEVICES"] == "-1"


def test_a_worker_takes_the_jobs_whose_gpus_fit_its_set():
    assert worker_queues(0, None) == ["cpu"]
    assert worker_queues(1, None) == ["gpu", "auto"]
    assert worker_queues(4, None) == ["gpu", "gpu2", "gpu3", "gpu4", "auto"]
    assert worker_queues(4, "gpu4") == ["gpu4"]  # kept for the jobs that need all of it
    assert [gpu_queue(n) for n in (1, 2, 8)] == ["gpu", "gpu2", "gpu8"]
    assert [gpus_of_queue(q) for q in ("cpu", "auto", "gpu", "gpu2", "gpu16")] == [0, 0, 1, 2, 16]
    assert [gpus_of_queue(q) for q in ("gpu1", "gpu02", "gpux", "gpu-2", "tpu")] == [None] * 5


@pytest.mark.parametrize(
    ("gpus", "queues", "why"),
    [
        (0, "cpu,gpu", "--queues gpu needs --gpu with at least 1 GPU(s) (this worker holds none)"),
        (1, "gpu2", "--queues gpu2 needs --gpu with at least 2 GPU(s) (this worker holds 1)"),
        (2, "gpu,gpu1", "unknown queue(s) gpu1"),
        (2, "", "unknown queue(s) (none given)"),
    ],
)
def test_a_worker_refuses_queues_it_cannot_serve(gpus, queues, why):
    with pytest.raises(ValueError) as raised:
        worker_queues(gpus, queues or ",")
    assert why in str(raised.value)


def test_a_gpu_runs_the_code_built_for_its_architecture_or_older_ptx():
    built = ["sm_80", "sm_90", "sm_100", "compute_120"]
    assert _runs_on(built, 9, 0) and _runs_on(built, 8, 6)  # sm_80 code runs on 8.6
    assert not _runs_on(built, 7, 5)  # Turing: nothing built for it
    assert _runs_on(built, 12, 1)  # PTX for 12.0 is compiled for 12.1 at load
    assert _runs_on(["sm_90a"], 9, 0) and not _runs_on(["sm_90a"], 8, 9)
