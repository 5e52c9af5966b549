"""The callback API on real runs: state keys in last.pt, hooks on failure, errors users see vs bugs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.engine.callbacks import Callback, EarlyStopping, TrainerView
from worker.engine.spec import parse_spec
from worker.engine.train import Trainer, prepare, run_job


def tiny_digits(doc: dict, **training) -> dict:
    """The digits example as a linear model: a run of a few epochs takes about a second."""
    doc = copy.deepcopy(doc)
    doc["model"] = {"layers": [{"type": "flatten"}, {"type": "linear", "out_features": 10}]}
    doc["training"].update(
        {"epochs": 2, "scheduler": None, "loss": "cross_entropy", "log_every_n_steps": 5}
    )
    doc["training"].update(training)
    doc["callbacks"] = {"checkpoint": {"monitor": "val_accuracy", "mode": "max"}}
    return doc


class Recorder(Callback):
    """Writes down the hooks it sees, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_fit_start(self, trainer: TrainerView) -> None:
        self.calls.append("on_fit_start")

    def on_epoch_end(self, trainer: TrainerView, epoch: int, metrics: dict[str, float]) -> None:
        self.calls.append(f"on_epoch_end {epoch}")

    def on_exception(self, trainer: TrainerView, exc: BaseException) -> None:
        self.calls.append(f"on_exception {type(exc).__name__}")

    def on_fit_end(self, trainer: TrainerView) -> None:
        self.calls.append("on_fit_end")


class BrokenCallback(Recorder):
    """A bug of ours, planted in a hook."""

    def on_epoch_end(self, trainer: TrainerView, epoch: int, metrics: dict[str, float]) -> None:
        super().on_epoch_end(trainer, epoch, metrics)
        raise KeyError("a bug in a hook")


def history(run_dir: Path, name: str) -> list[float]:
    from worker.engine.train import iter_metrics

    return [p["value"] for p in iter_metrics(run_dir) if p["name"] == name]


# ------------------------------------------------------------- state keys


def test_two_early_stoppings_keep_their_own_state_through_last_pt(load_example, tmp_path):
    doc, resolve = load_example("digits_cnn.json")
    spec = parse_spec(tiny_digits(doc))
    by_loss = EarlyStopping(monitor="val_loss", mode="min", patience=100)
    by_accuracy = EarlyStopping(monitor="val_accuracy", mode="max", patience=100)
    result = run_job(spec, tmp_path, resolve=resolve, callbacks=[by_loss, by_accuracy])
    assert result.status == "succeeded", result.error

    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["format"] == 2
    assert saved["callbacks"][by_loss.state_key]["best"] == min(history(tmp_path, "val_loss"))
    assert saved["callbacks"][by_accuracy.state_key]["best"] == max(
        history(tmp_path, "val_accuracy")
    )

    fresh_loss = EarlyStopping(monitor="val_loss", mode="min", patience=100)
    fresh_accuracy = EarlyStopping(monitor="val_accuracy", mode="max", patience=100)
    trainer = Trainer(
        spec, prepare(spec, resolve), tmp_path, callbacks=[fresh_loss, fresh_accuracy]
    )
    trainer.load_state(tmp_path / "last.pt")
    assert fresh_loss.state == by_loss.state
    assert fresh_accuracy.state == by_accuracy.state
    assert fresh_loss.state.best != fresh_accuracy.state.best


def test_callbacks_sharing_a_state_key_are_refused(load_example, tmp_path):
    doc, resolve = load_example("digits_cnn.json")
    twins = [EarlyStopping(monitor="val_loss", mode="min", patience=3) for _ in range(2)]
    with pytest.raises(ValueError, match="share a state_key"):
        run_job(parse_spec(tiny_digits(doc)), tmp_path, resolve=resolve, callbacks=twins)


def as_format_1(path: Path) -> None:
    """Rewrite a last.pt as runs before state_key wrote it: callbacks keyed by
    `name`, no scaler state when mixed precision was off."""
    state = torch.load(path, weights_only=True)
    names = {"ProgressTimer": "timer", "ModelCheckpoint": "checkpoint"}
    names["EarlyStopping"] = "early_stopping"
    state["callbacks"] = {
        names[key.split("{")[0]]: value for key, value in state["callbacks"].items()
    }
    state["format"] = 1
    state["scaler"] = None
    torch.save(state, path)


def test_last_pt_from_before_state_keys_still_resumes(load_example, tmp_path):
    doc, resolve = load_example("digits_cnn.json")
    doc = tiny_digits(doc, epochs=4)
    doc["callbacks"]["early_stopping"] = {"monitor": "val_loss", "patience": 10}
    full = run_job(parse_spec(doc), tmp_path / "full", resolve=resolve)

    first = copy.deepcopy(doc)
    first["training"]["epochs"] = 2
    run_job(parse_spec(first), tmp_path / "split", resolve=resolve)
    last = tmp_path / "split" / "last.pt"
    before = torch.load(last, weights_only=True)["callbacks"]
    as_format_1(last)

    spec = parse_spec(doc)
    trainer = Trainer(spec, prepare(spec, resolve), tmp_path / "split")
    trainer.load_state(last)
    assert {cb.state_key: cb.state_dict() for cb in trainer.callbacks}.keys() == before.keys()
    for cb in trainer.callbacks:
        if cb.name != "timer":  # the timer adds the time since it was loaded
            assert cb.state_dict() == before[cb.state_key], cb.name

    resumed = run_job(spec, tmp_path / "split", resolve=resolve, resume=True)
    assert resumed.status == full.status == "succeeded"
    assert (resumed.steps, resumed.best_epoch, resumed.best_value) == (
        full.steps,
        full.best_epoch,
        full.best_value,
    )
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert b["format"] == 2 and b["scaler"] == {}  # a disabled scaler's state, saved as such


# ------------------------------------------------------------- checkpoints


def test_best_is_a_byte_copy_of_its_top_k_file(load_example, tmp_path):
    """With save_top_k > 1 the best epoch's two files are the same bytes: the service
    stores a file of one sha256 once (safetensors orders its metadata at random)."""
    doc, resolve = load_example("digits_cnn.json")
    doc = tiny_digits(doc, epochs=4)
    doc["callbacks"]["checkpoint"]["save_top_k"] = 2
    result = run_job(parse_spec(doc), tmp_path, resolve=resolve)
    assert result.status == "succeeded", result.error
    kept = sorted(tmp_path.glob("epoch_*.safetensors"))
    assert len(kept) == 2
    best = (tmp_path / "best.safetensors").read_bytes()
    assert best == (tmp_path / f"epoch_{result.best_epoch}.safetensors").read_bytes()


# ------------------------------------------------------------------ hooks


def test_a_normal_run_ends_with_on_fit_end_and_no_on_exception(load_example, tmp_path):
    doc, resolve = load_example("digits_cnn.json")
    recorder = Recorder()
    result = run_job(parse_spec(tiny_digits(doc)), tmp_path, resolve=resolve, callbacks=[recorder])
    assert result.status == "succeeded", result.error
    assert recorder.calls == ["on_fit_start", "on_epoch_end 0", "on_epoch_end 1", "on_fit_end"]


def test_a_failed_run_calls_on_exception_then_on_fit_end(load_example, tmp_path):
    doc, resolve = load_example("digits_cnn.json")
    huge = tmp_path / "huge.npz"
    np.savez(huge, x=np.full((64, 1, 8, 8), 3e38, np.float32), y=np.zeros(64, np.int64))
    doc = tiny_digits(doc)
    doc["data"].update(train=str(huge), validation={"split": 0.25})
    recorder = Recorder()
    result = run_job(parse_spec(doc), tmp_path / "run", resolve=resolve, callbacks=[recorder])
    assert result.status == "failed"
    assert "became NaN or Inf" in result.error
    assert recorder.calls == ["on_fit_start", "on_exception RunFailed", "on_fit_end"]


def test_a_bug_in_a_callback_propagates_after_teardown(load_example, tmp_path):
    doc, resolve = load_example("digits_cnn.json")
    broken, recorder = BrokenCallback(), Recorder()
    with pytest.raises(KeyError, match="a bug in a hook"):
        run_job(
            parse_spec(tiny_digits(doc)), tmp_path, resolve=resolve, callbacks=[broken, recorder]
        )
    assert broken.calls == ["on_fit_start", "on_epoch_end 0", "on_exception KeyError", "on_fit_end"]
    # The other callbacks are told and torn down too.
    assert recorder.calls == ["on_fit_start", "on_exception KeyError", "on_fit_end"]
    assert not (tmp_path / "result.json").exists()


# ------------------------------------------- errors users see, one line each


def test_labels_past_the_models_classes_fail_with_one_line(load_example, tmp_path):
    doc, resolve = load_example("digits_cnn.json")
    bad = tmp_path / "bad_val.npz"
    rows = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    np.savez(bad, x=rows, y=np.full(20, 15, np.int64))  # 10 classes in the model
    doc = tiny_digits(doc)
    doc["data"]["validation"] = str(bad)
    result = run_job(parse_spec(doc), tmp_path / "run", resolve=resolve)
    # found before training, naming the file and the field (not a device-side assert)
    assert result.status == "failed" and result.steps == 0
    assert result.error.startswith(f"data.validation ({bad}): target field 'y' holds class 15")
    assert "\n" not in result.error


def test_a_model_without_parameters_fails_with_one_line(load_example, tmp_path):
    doc, resolve = load_example("tabular_mlp.json")
    doc["model"] = {"layers": [{"type": "relu"}]}
    doc["data"]["inputs"] = doc["data"]["targets"] = "height"
    doc["training"].update(loss="mse", metrics=[], epochs=1, scheduler=None)
    doc["callbacks"] = {}
    result = run_job(parse_spec(doc), tmp_path, resolve=resolve)
    assert result.status == "failed"
    assert result.error == "model: the model has no parameters to train"
