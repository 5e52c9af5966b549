"""A run preempted mid-epoch (a worker shutting down) and resumed equals an uninterrupted run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.worker.engine.test_train import comparable_metrics, small_digits
from worker.engine.spec import parse_spec
from worker.engine.train import run_job


def preempt_at_step(step: int):
    """A `preempt` callable that answers True once, after the given optimizer step."""
    calls = iter(range(1, 1 << 30))
    return lambda: next(calls) == step


def assert_same_run(full: Path, split: Path) -> None:
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, value in a["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, b["optimizer"]["state"][key][name]), (key, name)
    for key, value in load_file(str(full / "best.safetensors")).items():
        assert torch.equal(value, load_file(str(split / "best.safetensors"))[key])
    assert comparable_metrics(full) == comparable_metrics(split)


@pytest.mark.parametrize(
    ("data", "training"),
    [
        # in-memory batches, a step metric window that the preemption cuts in two
        ({"in_memory": "always"}, {"log_every_n_steps": 7}),
        # streamed through two DataLoader workers, gradients accumulated over 3 batches
        (
            {"in_memory": "never", "num_workers": 2},
            {"log_every_n_steps": 4, "accumulate_grad_batches": 3},
        ),
    ],
    ids=["in-memory", "dataloader-accumulated"],
)
def test_a_run_preempted_mid_epoch_then_resumed_matches_an_uninterrupted_run(
    load_example, tmp_path, data, training
):
    doc, resolve = load_example("digits_cnn.json")
    doc = small_digits(
        doc, epochs=3, scheduler={"type": "step", "step_size": 1, "gamma": 0.7}, **training
    )
    doc["data"].update(data)
    spec = parse_spec(doc)
    full = run_job(spec, tmp_path / "full", resolve=resolve)
    steps_per_epoch = full.steps // 3

    # mid-way through the second epoch, not on a logging step
    at = steps_per_epoch + steps_per_epoch // 2
    if at % spec.training.log_every_n_steps == 0:
        at += 1
    first = run_job(spec, tmp_path / "split", resolve=resolve, preempt=preempt_at_step(at))
    assert (first.status, first.stop_reason, first.steps, first.epochs_run) == (
        "preempted",
        "preempted",
        at,
        1,
    )
    saved = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, at)
    assert 0 < saved["position"]["batch"] < steps_per_epoch * spec.training.accumulate_grad_batches

    resumed = run_job(spec, tmp_path / "split", resolve=resolve, resume=True)
    assert resumed.status == full.status == "succeeded"
    assert (resumed.steps, resumed.best_epoch, resumed.best_value) == (
        full.steps,
        full.best_epoch,
        full.best_value,
    )
    assert resumed.final_metrics["loss"] == full.final_metrics["loss"]
    assert_same_run(tmp_path / "full", tmp_path / "split")


def test_a_run_preempted_twice_in_one_epoch_still_matches(load_example, tmp_path):
    doc, resolve = load_example("digits_cnn.json")
    spec = parse_spec(small_digits(doc, epochs=2, log_every_n_steps=5))
    full = run_job(spec, tmp_path / "full", resolve=resolve)
    for at in (3, 4):  # the second preemption resumes a mid-epoch state and stops again
        result = run_job(
            spec, tmp_path / "split", resolve=resolve, resume=True, preempt=preempt_at_step(at)
        )
        assert result.status == "preempted"
    resumed = run_job(spec, tmp_path / "split", resolve=resolve, resume=True)
    assert resumed.status == "succeeded" and resumed.steps == full.steps
    assert_same_run(tmp_path / "full", tmp_path / "split")


def test_a_preempted_run_without_save_last_leaves_no_state(load_example, tmp_path):
    doc, resolve = load_example("digits_cnn.json")
    doc = copy.deepcopy(small_digits(doc, epochs=2))
    doc["callbacks"]["checkpoint"]["save_last"] = False
    result = run_job(parse_spec(doc), tmp_path, resolve=resolve, preempt=preempt_at_step(3))
    assert result.status == "preempted"
    assert not (tmp_path / "last.pt").exists()
