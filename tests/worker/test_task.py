"""The worker task's pure parts (the rest runs end to end in tests/test_service_e2e.py)."""

import socket
import threading
import time

from worker.client import WorkerClient
from worker.engine.spec import parse_spec
from worker.task import _death_reason, _finish, _named, dataset_names, pin_to_worker_gpu


def spec_on(device: str):
    return parse_spec(
        {
            "data": {"train": "t.npz", "inputs": "x", "targets": "y"},
            "model": {"layers": [{"type": "linear", "out_features": 2}]},
            "training": {"loss": "cross_entropy", "device": device},
        }
    )


def test_a_gpu_worker_runs_any_cuda_device_on_its_own_gpu():
    assert pin_to_worker_gpu(spec_on("cuda:3"), "1").training.device == "cuda"
    assert pin_to_worker_gpu(spec_on("cuda"), "0").training.device == "cuda"
    assert pin_to_worker_gpu(spec_on("cpu"), "1").training.device == "cpu"
    assert pin_to_worker_gpu(spec_on("cuda:3"), None).training.device == "cuda:3"


def test_a_dead_training_process_gets_a_one_line_reason():
    assert _death_reason(-9) == "training process was killed by SIGKILL (out of memory?)"
    assert _death_reason(-11) == "training process was killed by SIGSEGV"
    assert "exited with code 3" in _death_reason(3)


def test_a_jobs_error_names_its_datasets_as_uploaded_not_by_the_caches_sha256():
    sha = "9f" * 32
    meta = {"ds_1": {"sha256": sha, "filename": "train.npz"}, "ds_2": {"sha256": "ab" * 32}}
    paths = {"ds_1": f"/work/datasets/{sha}.npz", "ds_2": f"/work/datasets/{'ab' * 32}.csv"}
    names = dataset_names(meta, paths)
    error = f"{sha}.npz: not a valid NPZ file (truncated); also {'ab' * 32}.csv: has no rows"
    assert _named(error, names) == (
        "train.npz (dataset ds_1): not a valid NPZ file (truncated); also dataset ds_2: has no rows"
    )


def test_finish_retries_an_unreachable_api_then_leaves_the_job_to_the_reconciler():
    # A peer that accepts each connection and hangs up at once: the API is unreachable.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted: list[int] = []

    def hang_up() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # the server socket closed: the test is over
                return
            accepted.append(1)
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    api = WorkerClient(f"http://127.0.0.1:{port}", "token", timeout=5.0)
    try:
        status = _finish(api, "job", "succeeded", {}, deadline=time.monotonic() + 1.0)
    finally:
        server.close()
    assert status == "unreported"
    assert len(accepted) >= 2  # asked again after a wait before it gave up
