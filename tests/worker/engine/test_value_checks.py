"""Labels, binary targets and token ids out of range fail a job before training, by name.

On CUDA each would be a "device-side assert triggered" at some later step; here
the run fails at once with the dataset, the field and the row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.engine.spec import parse_spec
from worker.engine.train import run_job


def mlp_spec(train: Path, validation: Path | None = None, **training) -> dict:
    doc = {
        "name": "labels",
        "data": {"train": str(train), "inputs": "x", "targets": "y", "batch_size": 8},
        "model": {"layers": [{"type": "linear", "out_features": 3}]},
        "training": {"epochs": 1, "loss": "cross_entropy", "device": "cpu", **training},
    }
    if validation is not None:
        doc["data"]["validation"] = str(validation)
    return doc


def write(path: Path, y: np.ndarray, x: np.ndarray | None = None) -> Path:
    x = np.random.default_rng(0).normal(size=(len(y), 4)).astype("float32") if x is None else x
    np.savez(path, x=x, y=y)
    return path


def run(doc: dict, tmp_path: Path):
    return run_job(parse_spec(doc), tmp_path / "run")


def test_a_class_label_past_the_outputs_classes_fails_naming_dataset_field_and_row(tmp_path):
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1], dtype="int64")
    # The training file's labels fit; the validation file has a 5 at row 6.
    bad = labels.copy()
    bad[6] = 5
    train, val = write(tmp_path / "train.npz", labels), write(tmp_path / "val.npz", bad)
    result = run(mlp_spec(train, val), tmp_path)
    assert result.status == "failed"
    assert result.error == (
        f"data.validation ({val}): target field 'y' holds class 5 at row 6, but the output "
        f"'output' has 3 classes (labels 0..2; -100 marks a target the loss ignores)"
    )
    assert result.steps == 0  # nothing trained


def test_a_negative_label_in_the_training_file_fails_before_training(tmp_path):
    labels = np.array([0, 1, 2, -1, 1, 2, 0, 1], dtype="int64")
    train = write(tmp_path / "train.npz", labels)
    result = run(mlp_spec(train), tmp_path)
    assert result.status == "failed"
    assert result.error.startswith(
        f"data.train ({train}): target field 'y' holds class -1 at row 3"
    )


def test_labels_of_minus_100_are_ignored_by_the_loss_and_pass_the_check(tmp_path):
    labels = np.array([0, 1, 2, -100, 1, 2, 0, -100], dtype="int64")
    train = write(tmp_path / "train.npz", labels)
    result = run(mlp_spec(train), tmp_path)
    assert result.status == "succeeded", result.error
    assert np.isfinite(result.final_metrics["loss"])


def test_a_bce_target_outside_0_1_fails_naming_the_field(tmp_path):
    y = np.array([[0.0], [1.0], [0.5], [1.5], [0.0], [1.0], [0.0], [1.0]], dtype="float32")
    train = write(tmp_path / "train.npz", y)
    doc = mlp_spec(train, loss="bce")
    doc["model"]["layers"] = [{"type": "linear", "out_features": 1}, {"type": "sigmoid"}]
    result = run(doc, tmp_path)
    assert result.status == "failed"
    assert result.error == (
        f"data.train ({train}): target field 'y' holds 1.5 at row 3, "
        f"but bce needs targets in [0, 1]"
    )


def test_a_token_id_past_the_embedding_table_fails_naming_the_input_field(tmp_path):
    # The build already refuses a training file whose ids outgrow the table (from the
    # dataset's description); the validation file is only read here.
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=(16, 6)).astype("int64")
    y = rng.integers(0, 3, size=16).astype("int64")
    train = write(tmp_path / "train.npz", y, x=tokens)
    tokens = tokens.copy()
    tokens[9, 2] = 50  # num_embeddings is 50: ids 0..49
    val = write(tmp_path / "val.npz", y, x=tokens)
    doc = mlp_spec(train, val)
    doc["model"]["layers"] = [
        {"type": "embedding", "num_embeddings": 50, "embedding_dim": 4},
        {"type": "flatten"},
        {"type": "linear", "out_features": 3},
    ]
    result = run(doc, tmp_path)
    assert result.status == "failed"
    assert result.error == (
        f"data.validation ({val}): input field 'x' holds token id 50 at row 9, "
        f"but its embedding has num_embeddings 50 (ids 0..49)"
    )
