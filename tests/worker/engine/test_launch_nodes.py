"""Several nodes on one machine: two launchers on 127.0.0.1, each one node of one rank.

The nodes meet through node 0's c10d TCPStore at an endpoint both are given (what
the service would hand each member of a gang); the run must be the very run of two
ranks on one node (same global ranks, same shards, gloo either way).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.test_service_e2e import free_port

ROOT = Path(__file__).resolve().parents[3]
TIMING = {"epoch_time_s", "samples_per_s"}

# One node of a multi-node launch: what a worker's training child would run.
NODE = """
import json, sys
from pathlib import Path
from app.cli.local import _train_rank
from worker.engine.launch import launch_ranks

spec, out, node, endpoint = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
document = Path(spec).read_bytes()
result = launch_ranks(
    _train_rank, (document, out, spec, False, 10**9, True), nproc=1, run_dir=Path(out),
    nodes=2, node_rank=node, endpoint=endpoint, run_id="two-nodes",
)
print(json.dumps(result.as_dict()))
sys.exit(0 if result.status == "succeeded" else 1)
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 8)).astype(np.float32) * 2
    for name, rows in (("train", 150), ("val", 40)):
        y = rng.integers(0, 3, size=rows)
        x = centers[y] + rng.normal(size=(rows, 8)).astype(np.float32)
        np.savez(tmp_path / f"{name}.npz", x=x.astype(np.float32), y=y.astype(np.int64))
    return tmp_path


def spec(**resources: int) -> dict:
    return {
        "seed": 5,
        "data": {
            "train": "train.npz",
            "validation": "val.npz",
            "inputs": "x",
            "targets": "y",
            "batch_size": 16,
        },
        "model": {
            "layers": [
                {"type": "linear", "out_features": 16},
                {"type": "relu"},
                {"type": "linear", "out_features": 3},
            ]
        },
        "training": {
            "epochs": 3,
            "loss": "cross_entropy",
            "optimizer": {"type": "sgd", "lr": 0.1},
            "metrics": ["accuracy"],
            "log_every_n_steps": 5,
            "device": "cpu",
        },
        "callbacks": {"checkpoint": {"monitor": "val_accuracy"}},
        "resources": resources,
    }


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def metrics(run: Path) -> dict[tuple[str, int], float]:
    points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(p["name"], p["step"]): p["value"] for p in points if p["name"] not in TIMING}


def test_two_nodes_meeting_at_node_0s_endpoint_train_as_two_ranks_on_one_node(folder):
    (folder / "nodes.json").write_text(json.dumps(spec(processes=1, nodes=2)))
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [sys.executable, "-c", NODE, "nodes.json", f"node{n}", str(n), endpoint],
            cwd=folder,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 0)  # node 1 first: it waits for node 0's store
    ]
    outputs = [proc.communicate(timeout=600) for proc in nodes]
    for proc, (out, err) in zip(nodes, outputs, strict=True):
        assert proc.returncode == 0, out + err[-3000:]

    (folder / "local.json").write_text(json.dumps(spec(processes=2)))
    argv = [sys.executable, "-m", "app.cli", "train", "local.json", "-o", "local", "-q"]
    local = subprocess.run(argv, cwd=folder, env=env(), capture_output=True, text=True)
    assert local.returncode == 0, local.stdout + local.stderr[-3000:]

    # Only global rank 0 (on node 0) writes the run's files.
    assert (folder / "node0" / "best.safetensors").exists()
    assert not (folder / "node1" / "best.safetensors").exists()
    assert metrics(folder / "node0") == metrics(folder / "local")
    got = load_file(str(folder / "node0" / "best.safetensors"))
    want = load_file(str(folder / "local" / "best.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    state = torch.load(folder / "node0" / "last.pt", map_location="cpu", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
