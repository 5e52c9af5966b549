"""`last.pt` travels between machines: CPU tensors only, and the training GPU's RNG alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from worker.engine.spec import parse_spec
from worker.engine.train import run_job

ROOT = Path(__file__).resolve().parents[3]


def tiny_spec(train: Path, **training) -> dict:
    return {
        "name": "state",
        "data": {"train": str(train), "inputs": "x", "targets": "y", "batch_size": 8},
        "model": {"layers": [{"type": "linear", "out_features": 3}]},
        "training": {"epochs": 2, "loss": "cross_entropy", "device": "cpu", **training},
        "callbacks": {"checkpoint": {"monitor": "loss", "mode": "min"}},
    }


def write_data(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    path = folder / "train.npz"
    np.savez(
        path,
        x=rng.normal(size=(32, 4)).astype("float32"),
        y=rng.integers(0, 3, size=32).astype("int64"),
    )
    return path


def tensors_in(value, where="state"):
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensors_in(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from tensors_in(item, f"{where}[{i}]")


def test_last_pt_holds_cpu_tensors_and_no_per_gpu_rng_list(tmp_path):
    spec = parse_spec(tiny_spec(write_data(tmp_path)))
    assert run_job(spec, tmp_path / "run").status == "succeeded"
    # No map_location: each tensor comes back on the device it was saved from.
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    found = dict(tensors_in(state))
    assert "state.model.layers.linear.weight" in found  # the walk reaches the weights
    assert {where for where, t in found.items() if t.device.type != "cpu"} == set()
    assert "state.optimizer.state.0.exp_avg" in found  # optimizer state too
    assert state["rng"]["cuda"] is None  # a CPU run has no GPU generator to save


def test_a_last_pt_from_a_two_gpu_machine_resumes_on_a_cpu_only_one(tmp_path):
    data = write_data(tmp_path)
    run = tmp_path / "run"
    assert run_job(parse_spec(tiny_spec(data, epochs=1)), run).status == "succeeded"
    # As the format-1 files before this change stored it: every visible GPU's state.
    state = torch.load(run / "last.pt", weights_only=True)
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    torch.save(state, run / "last.pt")
    result = run_job(parse_spec(tiny_spec(data, epochs=3)), run, resume=True)
    assert result.status == "succeeded", result.error
    assert result.epochs_run == 3


def test_a_deterministic_run_sets_the_cublas_workspace_before_cuda_starts(tmp_path):
    data = write_data(tmp_path)
    script = (
        "import json, os, sys; from pathlib import Path;"
        "from worker.engine.spec import parse_spec; from worker.engine.train import run_job;"
        "doc = json.loads(sys.argv[1]);"
        "result = run_job(parse_spec(doc), Path(sys.argv[2]));"
        "print(result.status, os.environ.get('CUBLAS_WORKSPACE_CONFIG'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)
    outputs = []
    for deterministic in (True, False):
        doc = tiny_spec(data, epochs=1, deterministic=deterministic)
        done = subprocess.run(
            [sys.executable, "-c", script, json.dumps(doc), str(tmp_path / f"run{deterministic}")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.split()[-2:])
    assert outputs == [["succeeded", ":4096:8"], ["succeeded", "None"]]
