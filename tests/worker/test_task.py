"""The worker task's pure parts (the rest runs end to end in tests/test_service_e2e.py)."""

from worker.engine.spec import parse_spec
from worker.task import _death_reason, pin_to_worker_gpu


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
