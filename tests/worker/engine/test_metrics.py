"""Epoch metrics: names as Keras gives them, values equal to one pass over the whole set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine.losses import CombinedLoss
from worker.engine.metrics import MetricAccumulator, metric_fit_error, metric_names
from worker.engine.spec import JobSpec, LossSpec, MetricSpec

BATCH_SIZES = [7, 3, 5, 1, 8]


def job(targets, loss, metrics, *, validation=None) -> JobSpec:
    return JobSpec.model_validate(
        {
            "data": {
                "train": "train.npz",
                "inputs": "x",
                "targets": targets,
                "validation": validation,
            },
            "model": {"layers": [{"type": "linear", "out_features": 3}]},
            "training": {"loss": loss, "metrics": metrics},
        }
    )


def run_epoch(acc: MetricAccumulator, spec: JobSpec, outputs, targets) -> dict[str, float]:
    """Feed whole-set tensors to the accumulator in batches of uneven size; return compute()."""
    loss_fn = CombinedLoss(spec.training.losses(spec.output_names))
    acc.reset()
    start = 0
    for size in BATCH_SIZES:
        out = {k: v[start : start + size] for k, v in outputs.items()}
        tgt = {k: v[start : start + size] for k, v in targets.items()}
        total, each = loss_fn(out, tgt)
        acc.update(out, tgt, each, total, size)
        start += size
    return acc.compute()


N = sum(BATCH_SIZES)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def log_softmax_np(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


# ------------------------------------------------------------------- names


def test_metric_names_single_output_without_validation():
    spec = job("y", "cross_entropy", ["accuracy", {"type": "top_k_accuracy", "k": 3}])
    assert metric_names(spec) == [
        "loss",
        "accuracy",
        "top_3_accuracy",
        "lr",
        "epoch_time_s",
        "samples_per_s",
    ]


def test_metric_names_single_output_with_validation():
    spec = job("y", "mse", ["mae", "rmse"], validation={"split": 0.2})
    assert metric_names(spec) == [
        "loss",
        "mae",
        "rmse",
        "val_loss",
        "val_mae",
        "val_rmse",
        "lr",
        "epoch_time_s",
        "samples_per_s",
    ]


def test_metric_names_several_outputs():
    spec = job(
        {"label": "y", "value": "v"},
        {"label": "cross_entropy", "value": {"type": "mse", "weight": 0.5}},
        {"label": ["accuracy"], "value": ["mae", "mse"]},
        validation="val.npz",
    )
    names = metric_names(spec)
    train = ["loss", "label_loss", "label_accuracy", "value_loss", "value_mae", "value_mse"]
    assert names == [*train, *(f"val_{n}" for n in train), "lr", "epoch_time_s", "samples_per_s"]


def test_metric_names_one_named_output_is_keras_single_output_style():
    spec = job({"digit": "y"}, "cross_entropy", ["accuracy"])
    assert metric_names(spec)[:2] == ["loss", "accuracy"]


def test_same_metric_listed_twice_is_reported_once():
    spec = job("y", "cross_entropy", ["accuracy", "accuracy"])
    assert metric_names(spec).count("accuracy") == 1


# ------------------------------------------------------------------ values


def test_classification_metrics_over_uneven_batches_equal_whole_set(gen):
    spec = job("y", "cross_entropy", ["accuracy", {"type": "top_k_accuracy", "k": 2}])
    logits = torch.randn(N, 4, generator=gen)
    labels = torch.randint(0, 4, (N,), generator=gen)
    acc = MetricAccumulator(spec)
    result = run_epoch(acc, spec, {"output": logits}, {"output": labels})

    x, y = logits.numpy().astype(np.float64), labels.numpy()
    top2 = np.argsort(-x, axis=1)[:, :2]
    assert set(result) == {"loss", "accuracy", "top_2_accuracy"}
    assert result["loss"] == pytest.approx(-log_softmax_np(x)[np.arange(N), y].mean(), rel=1e-5)
    assert result["accuracy"] == pytest.approx((x.argmax(1) == y).mean())
    assert result["top_2_accuracy"] == pytest.approx((top2 == y[:, None]).any(1).mean())


def test_accuracy_against_probability_targets_uses_their_argmax(gen):
    spec = job("y", "cross_entropy", ["accuracy"])
    logits = torch.randn(N, 3, generator=gen)
    probs = torch.softmax(torch.randn(N, 3, generator=gen) * 3, dim=1)
    result = run_epoch(MetricAccumulator(spec), spec, {"output": logits}, {"output": probs})
    expected = (logits.argmax(1) == probs.argmax(1)).double().mean().item()
    assert result["accuracy"] == pytest.approx(expected)


def test_per_pixel_accuracy_counts_pixels(gen):
    spec = job("y", "cross_entropy", ["accuracy"])
    logits = torch.randn(N, 3, 4, 4, generator=gen)
    labels = torch.randint(0, 3, (N, 4, 4), generator=gen)
    result = run_epoch(MetricAccumulator(spec), spec, {"output": logits}, {"output": labels})
    expected = (logits.numpy().argmax(1) == labels.numpy()).mean()
    assert result["accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize(("loss", "threshold"), [("bce_with_logits", 0.0), ("bce", 0.5)])
def test_binary_accuracy_thresholds_logits_at_0_and_probabilities_at_half(gen, loss, threshold):
    spec = job("y", loss, ["accuracy"])
    raw = torch.randn(N, 3, generator=gen)
    output = raw if loss == "bce_with_logits" else torch.sigmoid(raw)
    targets = (torch.rand(N, 3, generator=gen) > 0.5).float()
    result = run_epoch(MetricAccumulator(spec), spec, {"output": output}, {"output": targets})
    expected = ((output.numpy() > threshold) == (targets.numpy() > 0.5)).mean()
    assert result["accuracy"] == pytest.approx(expected)


def test_regression_metrics_over_uneven_batches_equal_whole_set(gen):
    spec = job("y", "huber", ["mae", "mse", "rmse"])
    output = torch.randn(N, 1, generator=gen) * 3
    target = torch.randn(N, generator=gen)  # a single column: () per sample
    result = run_epoch(MetricAccumulator(spec), spec, {"output": output}, {"output": target})

    diff = output.numpy()[:, 0].astype(np.float64) - target.numpy()
    assert result["mae"] == pytest.approx(np.abs(diff).mean(), rel=1e-6)
    assert result["mse"] == pytest.approx((diff**2).mean(), rel=1e-6)
    # over the epoch, not a mean of per-batch values
    assert result["rmse"] == pytest.approx(np.sqrt((diff**2).mean()), rel=1e-6)
    assert result["loss"] == pytest.approx(
        torch.nn.functional.huber_loss(output[:, 0], target).item(), rel=1e-5
    )


def test_several_outputs_with_val_prefix(gen):
    spec = job(
        {"label": "y", "value": "v"},
        {"label": "cross_entropy", "value": {"type": "mse", "weight": 0.5}},
        {"label": ["accuracy"], "value": ["mae"]},
        validation={"split": 0.1},
    )
    outputs = {"label": torch.randn(N, 3, generator=gen), "value": torch.randn(N, 2, generator=gen)}
    targets = {
        "label": torch.randint(0, 3, (N,), generator=gen),
        "value": torch.randn(N, 2, generator=gen),
    }
    acc = MetricAccumulator(spec, prefix="val_")
    result = run_epoch(acc, spec, outputs, targets)

    assert (
        list(result)
        == acc.names
        == [
            "val_loss",
            "val_label_loss",
            "val_label_accuracy",
            "val_value_loss",
            "val_value_mae",
        ]
    )
    ce = torch.nn.functional.cross_entropy(outputs["label"], targets["label"]).item()
    mse = torch.nn.functional.mse_loss(outputs["value"], targets["value"]).item()
    assert result["val_label_loss"] == pytest.approx(ce, rel=1e-5)
    assert result["val_value_loss"] == pytest.approx(mse, rel=1e-5)
    assert result["val_loss"] == pytest.approx(ce + 0.5 * mse, rel=1e-5)
    mae = (outputs["value"] - targets["value"]).abs().mean().item()
    assert result["val_value_mae"] == pytest.approx(mae, rel=1e-5)
    assert set(result) <= set(metric_names(spec))


def test_reset_starts_a_new_epoch(gen):
    spec = job("y", "mse", ["mae"])
    acc = MetricAccumulator(spec)
    run_epoch(acc, spec, {"output": torch.full((N, 1), 5.0)}, {"output": torch.zeros(N, 1)})
    result = run_epoch(acc, spec, {"output": torch.ones(N, 1)}, {"output": torch.zeros(N, 1)})
    assert result == {"loss": pytest.approx(1.0), "mae": pytest.approx(1.0)}
    acc.reset()
    assert all(np.isnan(v) for v in acc.compute().values())


def test_validation_updates_under_inference_mode_and_training_updates_with_grad(gen):
    spec = job("y", "mse", ["mae"])
    acc = MetricAccumulator(spec, prefix="val_")
    layer = torch.nn.Linear(2, 1)
    x, y = torch.randn(4, 2, generator=gen), torch.randn(4, 1, generator=gen)
    loss_fn = CombinedLoss(spec.training.losses(spec.output_names))
    for _ in range(2):  # reset outside, update inside, twice: the validation pattern
        acc.reset()
        with torch.inference_mode():
            total, each = loss_fn({"output": layer(x)}, {"output": y})
            acc.update({"output": layer(x)}, {"output": y}, each, total, 4)
        assert np.isfinite(acc.compute()["val_mae"])
    total, each = loss_fn({"output": layer(x)}, {"output": y})
    acc.update({"output": layer(x)}, {"output": y}, each, total, 4)
    total.backward()  # the accumulator kept nothing of the graph alive or modified
    assert layer.weight.grad is not None


# --------------------------------------------------------- no host sync


def test_update_does_no_host_sync():
    """On the meta device every sync (.item(), .tolist(), bool(tensor)) raises; update must not."""
    spec = job(
        {"label": "y", "value": "v", "flag": "f"},
        {"label": "cross_entropy", "value": "mse", "flag": "bce_with_logits"},
        {
            "label": ["accuracy", {"type": "top_k_accuracy", "k": 2}],
            "value": ["mae", "mse", "rmse"],
            "flag": ["accuracy"],
        },
    )
    meta = torch.device("meta")
    acc = MetricAccumulator(spec, device=meta)
    outputs = {
        "label": torch.empty(8, 5, device=meta),
        "value": torch.empty(8, 1, device=meta),
        "flag": torch.empty(8, 1, device=meta),
    }
    targets = {
        "label": torch.empty(8, dtype=torch.long, device=meta),
        "value": torch.empty(8, device=meta),
        "flag": torch.empty(8, 1, device=meta),
    }
    loss_fn = CombinedLoss(spec.training.losses(spec.output_names)).to(meta)
    total, each = loss_fn(outputs, targets)
    for _ in range(3):
        acc.update(outputs, targets, each, total, 8)
    with pytest.raises((RuntimeError, NotImplementedError)):
        acc.compute()  # the one place that does read the device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_does_no_host_sync_on_cuda():
    spec = job("y", "cross_entropy", ["accuracy", {"type": "top_k_accuracy", "k": 2}])
    device = torch.device("cuda")
    acc = MetricAccumulator(spec, device=device)
    loss_fn = CombinedLoss(spec.training.losses(spec.output_names)).to(device)
    outputs = {"output": torch.randn(16, 4, device=device)}
    targets = {"output": torch.randint(0, 4, (16,), device=device)}
    total, each = loss_fn(outputs, targets)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        acc.update(outputs, targets, each, total, 16)
        acc.update(outputs, targets, each, total, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert 0.0 <= acc.compute()["accuracy"] <= 1.0


# ------------------------------------------------------------- fit checks


@pytest.mark.parametrize(
    ("metric", "loss", "shape", "words"),
    [
        ("accuracy", "mse", (1,), ["accuracy needs a classification loss", "mse"]),
        ({"type": "top_k_accuracy", "k": 5}, "bce_with_logits", (3,), ["cross_entropy or nll"]),
        (
            {"type": "top_k_accuracy", "k": 5},
            "cross_entropy",
            (3,),
            ["at least 5 classes", "(batch, 3)"],
        ),
        ("mae", "cross_entropy", (3,), ["mae", "class scores"]),
    ],
)
def test_metric_misfit_says_why(metric, loss, shape, words):
    message = metric_fit_error(
        MetricSpec.model_validate(metric), LossSpec.model_validate(loss), shape
    )
    assert message is not None
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    ("metric", "loss"),
    [
        ("accuracy", "cross_entropy"),
        ("accuracy", "bce"),
        ("top_k_accuracy", "nll"),
        ("rmse", "l1"),
        ("mse", "bce"),
    ],
)
def test_metric_fits(metric, loss):
    assert (
        metric_fit_error(MetricSpec.model_validate(metric), LossSpec.model_validate(loss), (5,))
        is None
    )


def test_accumulator_refuses_a_metric_its_loss_cannot_give():
    with pytest.raises(ValueError, match="metric accuracy: accuracy needs a classification loss"):
        MetricAccumulator(job("y", "mse", ["accuracy"]))
