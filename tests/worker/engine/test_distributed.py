"""Data-parallel training: real ranks (gloo on the CPU) started by `torchyard train`.

Each launch spawns two processes that import torch, so the runs are shared
between tests where they can be (module-scoped fixtures).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from worker.engine.errors import SpecError
from worker.engine.spec import parse_spec
from worker.engine.train import iter_metrics, run_job

ROOT = Path(__file__).resolve().parents[3]
TIMING = {"epoch_time_s", "samples_per_s"}


def torchyard_train(spec: dict, folder: Path, out: Path, *extra: str) -> subprocess.Popen:
    path = folder / f"{out.name}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "train", str(path), "-o", str(out), "-q", *extra],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Separable 3-class data: 203 training rows (batch 16 leaves a last batch of 11,
    split 6 + 5 between two ranks) and 57 validation rows (the same, 9 split 5 + 4)."""
    out = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)).astype(np.float32) * 2
    for name, rows in (("train", 203), ("val", 57)):
        y = rng.integers(0, 3, size=rows)
        x = centers[y] + rng.normal(size=(rows, 8)).astype(np.float32)
        np.savez(out / f"{name}.npz", x=x.astype(np.float32), y=y.astype(np.int64))
    return out


def spec_doc(**resources) -> dict:
    return {
        "seed": 3,
        "data": {
            "train": "train.npz",
            "validation": "val.npz",
            "inputs": "x",
            "targets": "y",
            "batch_size": 16,
        },
        "model": {
            "layers": [
                {"type": "linear", "out_features": 32},
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
        },
        "callbacks": {"checkpoint": {"monitor": "val_accuracy"}},
        "resources": resources,
    }


@pytest.fixture(scope="module")
def one_and_two(folder: Path) -> tuple[Path, Path]:
    """The same spec trained by one process (in this one) and by two ranks (the CLI)."""
    two = torchyard_train(spec_doc(processes=2), folder, folder / "two")
    one = run_job(parse_spec(spec_doc()), folder / "one", resolve=lambda ref: folder / ref)
    assert one.status == "succeeded", one.error
    code, _, err = finish(two)
    assert code == 0, err
    return folder / "one", folder / "two"


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def test_two_ranks_train_the_same_weights_as_one_process_with_the_same_global_batch(
    one_and_two,
):
    one, two = one_and_two
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    state = torch.load(two / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (3, 3 * 13)  # 203 rows: 13 batches of 16


def test_metrics_are_reduced_across_ranks_before_they_are_reported(one_and_two):
    one, two = (
        {(p["name"], p["step"]): p["value"] for p in iter_metrics(run) if p["name"] not in TIMING}
        for run in one_and_two
    )
    assert one.keys() == two.keys()
    for key, value in one.items():
        if "accuracy" in key[0]:
            assert two[key] == value, key  # counts of correct rows: exact
        else:
            assert two[key] == pytest.approx(value, rel=1e-5), key
    result = json.loads((one_and_two[1] / "result.json").read_text())
    assert result["final_metrics"]["val_accuracy"] == one[("val_accuracy", 39)]


def test_only_rank_0_writes_files_and_every_rank_s_random_state_is_saved(one_and_two):
    _, two = one_and_two
    assert sorted(p.name for p in two.iterdir()) == [
        "best.safetensors",
        "last.pt",
        "metrics.jsonl",
        "result.json",
    ]
    points = [(p["name"], p["step"]) for p in iter_metrics(two)]
    assert len(points) == len(set(points))  # one writer: no point twice
    state = torch.load(two / "last.pt", weights_only=True)
    assert state["world_size"] == 2
    rng = state["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    best = load_file(str(two / "best.safetensors"))
    assert best.keys() == state["model"].keys()


def test_resuming_with_another_world_size_is_refused(one_and_two, tmp_path):
    _, two = one_and_two
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(two / "last.pt", run / "last.pt")
    doc = spec_doc()
    doc["training"]["epochs"] = 4
    result = run_job(parse_spec(doc), run, resolve=lambda ref: two.parent / ref, resume=True)
    assert result.status == "failed"
    assert "written by a run of 2 rank(s), this run has 1" in result.error


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """Local rank -> pid of the launcher's rank processes: its spawned children, which
    the agent starts in rank order (their RANK is set after the start, so /proc's
    environ does not show it)."""
    ranks = []
    for child in psutil.Process(proc.pid).children():
        try:
            cmdline = " ".join(child.cmdline())
            if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
                ranks.append((child.create_time(), child.pid))
        except psutil.NoSuchProcess:
            continue
    return {rank: pid for rank, (_, pid) in enumerate(sorted(ranks))}


def test_a_rank_killed_fails_the_run_and_resume_matches_an_uninterrupted_run(folder):
    doc = spec_doc(processes=2)
    # Dropout: each rank's own random stream must be restored for bit-exact weights.
    doc["model"]["layers"].insert(2, {"type": "dropout", "p": 0.2})
    doc["training"]["epochs"] = 40
    full = torchyard_train(doc, folder, folder / "full")
    killed = torchyard_train(doc, folder, folder / "killed")
    last = folder / "killed" / "last.pt"
    while not last.exists() and killed.poll() is None:
        time.sleep(0.02)
    pids = rank_pids(killed)
    assert killed.poll() is None, "the run ended before a rank could be killed"
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGKILL)

    code, _, err = finish(killed)  # ends: rank 0 is not left waiting for rank 1
    assert code == 1
    result = json.loads((folder / "killed" / "result.json").read_text())
    assert result["status"] == "failed"
    assert "rank 1" in result["error"] and "SIGKILL" in result["error"]
    assert result["lost"] is True  # not the job's fault: the service would restart it
    assert "--resume" in err
    assert all(not psutil.pid_exists(pid) for pid in pids.values())
    stopped_at = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= stopped_at < 40

    code, _, err = finish(torchyard_train(doc, folder, folder / "killed", "--resume"))
    assert code == 0, err
    code, _, err = finish(full)
    assert code == 0, err
    a, b = (torch.load(folder / run / "last.pt", weights_only=True) for run in ("full", "killed"))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (40, 40 * 13)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_a_data_parallel_spec_run_without_a_launcher_fails_saying_how_to_start_it(folder):
    result = run_job(
        parse_spec(spec_doc(processes=2)), folder / "alone", resolve=lambda ref: folder / ref
    )
    assert result.status == "failed"
    assert "resources ask for 2 ranks" in result.error and "torchyard train" in result.error


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        ({"resources": {"processes": 3}}, "data.batch_size", "16 is not a multiple of 3"),
        ({"resources": {"gpus": 2, "nodes": 3}}, "data.batch_size", "6 ranks"),
        ({"resources": {"processes": 2, "gpus": 2}}, "resources.processes", "not both"),
        (
            {"resources": {"processes": 2}, "training": {"device": "cuda"}},
            "resources.processes",
            "give resources.gpus",
        ),
        (
            {"resources": {"gpus": 2}, "training": {"device": "cpu"}},
            "training.device",
            "resources.processes for CPU ranks",
        ),
        (
            {"resources": {"gpus": 2}, "training": {"device": "cuda:1"}},
            "training.device",
            "use 'cuda' or 'auto'",
        ),
        (
            {"resources": {"processes": 2}, "training": {"sync_batchnorm": True}},
            "training.sync_batchnorm",
            "GPU ranks only",
        ),
        ({"resources": {"nodes": 0}}, "resources.nodes", "greater than or equal to 1"),
    ],
)
def test_bad_data_parallel_specs_name_the_path(change, path, words):
    doc = spec_doc()
    for section, values in change.items():
        doc[section] = {**doc[section], **values}
    with pytest.raises(SpecError) as caught:
        parse_spec(doc)
    issues = {issue.path: issue.message for issue in caught.value.issues}
    assert path in issues, issues
    assert words in issues[path]


def test_validate_reports_the_world_size_and_the_per_rank_batch(folder):
    doc = copy.deepcopy(spec_doc(processes=2))
    path = folder / "validate.json"
    path.write_text(json.dumps(doc))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    command = [sys.executable, "-m", "app.cli", "validate", str(path)]
    run = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert (summary["world_size"], summary["batch_size"], summary["batch_per_rank"]) == (2, 16, 8)
    assert summary["backend"] == "gloo"
    text = subprocess.run(command, env=env, capture_output=True, text=True).stdout
    assert "world size 2" in text and "16 global, 8 per rank" in text
