"""Losses from the spec: same values as torch's functionals, shape checks that say what is wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.engine.fields import FieldInfo
from worker.engine.losses import CombinedLoss, loss_fit_error, make_loss, target_dtype, target_shape
from worker.engine.spec import LossSpec


def spec(**kwargs) -> LossSpec:
    return LossSpec.model_validate(kwargs)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ------------------------------------------------------------------ values


def test_cross_entropy_with_label_smoothing_and_class_weights_matches_functional(gen):
    logits = torch.randn(7, 4, generator=gen)
    labels = torch.randint(0, 4, (7,), generator=gen)
    weights = [1.0, 2.0, 0.5, 3.0]
    loss = make_loss(spec(type="cross_entropy", label_smoothing=0.1, class_weights=weights))
    expected = F.cross_entropy(logits, labels, weight=torch.tensor(weights), label_smoothing=0.1)
    torch.testing.assert_close(loss(logits, labels), expected)


def test_cross_entropy_with_probability_targets_matches_functional(gen):
    logits = torch.randn(5, 3, generator=gen)
    probs = torch.softmax(torch.randn(5, 3, generator=gen), dim=1)
    loss = make_loss(spec(type="cross_entropy"))
    torch.testing.assert_close(loss(logits, probs), F.cross_entropy(logits, probs))


def test_cross_entropy_per_pixel_matches_functional(gen):
    logits = torch.randn(2, 3, 4, 4, generator=gen)
    labels = torch.randint(0, 3, (2, 4, 4), generator=gen)
    loss = make_loss(spec(type="cross_entropy"))
    torch.testing.assert_close(loss(logits, labels), F.cross_entropy(logits, labels))


def test_nll_with_class_weights_matches_functional(gen):
    log_probs = torch.log_softmax(torch.randn(6, 3, generator=gen), dim=1)
    labels = torch.randint(0, 3, (6,), generator=gen)
    loss = make_loss(spec(type="nll", class_weights=[0.2, 1.0, 4.0]))
    expected = F.nll_loss(log_probs, labels, weight=torch.tensor([0.2, 1.0, 4.0]))
    torch.testing.assert_close(loss(log_probs, labels), expected)


def test_bce_matches_functional(gen):
    probs = torch.rand(8, 3, generator=gen)
    targets = (torch.rand(8, 3, generator=gen) > 0.5).float()
    loss = make_loss(spec(type="bce"))
    torch.testing.assert_close(loss(probs, targets), F.binary_cross_entropy(probs, targets))


def test_bce_with_logits_and_pos_weight_matches_functional(gen):
    logits = torch.randn(8, 3, generator=gen)
    targets = (torch.rand(8, 3, generator=gen) > 0.5).float()
    loss = make_loss(spec(type="bce_with_logits", pos_weight=[1.0, 2.0, 3.0]))
    expected = F.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=torch.tensor([1.0, 2.0, 3.0])
    )
    torch.testing.assert_close(loss(logits, targets), expected)

    scalar = make_loss(spec(type="bce_with_logits", pos_weight=2.5))
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor([2.5]))
    torch.testing.assert_close(scalar(logits, targets), expected)


@pytest.mark.parametrize(
    ("loss_spec", "functional"),
    [
        ({"type": "mse"}, F.mse_loss),
        ({"type": "l1"}, F.l1_loss),
        ({"type": "smooth_l1", "beta": 0.3}, lambda o, t: F.smooth_l1_loss(o, t, beta=0.3)),
        ({"type": "huber", "delta": 0.7}, lambda o, t: F.huber_loss(o, t, delta=0.7)),
    ],
)
def test_regression_losses_match_functional(gen, loss_spec, functional):
    output = torch.randn(9, 2, generator=gen) * 2
    target = torch.randn(9, 2, generator=gen)
    torch.testing.assert_close(
        make_loss(spec(**loss_spec))(output, target), functional(output, target)
    )


def test_single_column_target_is_reshaped_not_broadcast(gen):
    # (batch, 1) against (batch,) would broadcast to (batch, batch) in torch itself.
    output = torch.randn(6, 1, generator=gen)
    target = torch.randn(6, generator=gen)
    loss = make_loss(spec(type="mse"))
    torch.testing.assert_close(loss(output, target), F.mse_loss(output, target[:, None]))


def test_integer_bce_targets_are_cast_to_float(gen):
    logits = torch.randn(5, 1, generator=gen)
    targets = torch.tensor([[0], [1], [1], [0], [1]])
    loss = make_loss(spec(type="bce_with_logits"))
    expected = F.binary_cross_entropy_with_logits(logits, targets.float())
    torch.testing.assert_close(loss(logits, targets), expected)


def test_bf16_outputs_are_reduced_in_float32(gen):
    logits = torch.randn(4, 3, generator=gen)
    labels = torch.tensor([0, 2, 1, 1])
    loss = make_loss(spec(type="cross_entropy"))
    value = loss(logits.bfloat16(), labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, F.cross_entropy(logits.bfloat16().float(), labels))


def test_bce_runs_under_autocast(gen):
    probs = torch.rand(4, 1, generator=gen)
    targets = torch.ones(4, 1)
    loss = make_loss(spec(type="bce"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(probs.bfloat16(), targets)
    assert value.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bce_runs_under_cuda_autocast_which_torch_refuses_for_it():
    probs = torch.rand(4, 1, device="cuda")
    loss = make_loss(spec(type="bce")).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        value = loss(probs.half(), torch.ones(4, 1, device="cuda"))
    assert value.dtype == torch.float32


def test_class_weights_move_with_the_module():
    loss = make_loss(spec(type="cross_entropy", class_weights=[1.0, 2.0]))
    buffers = dict(loss.named_buffers())
    assert any(name.endswith("weight") for name in buffers)
    moved = loss.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in moved.buffers())


def test_combined_loss_sums_weighted_losses_and_reports_each(gen):
    outputs = {"label": torch.randn(5, 3, generator=gen), "value": torch.randn(5, 1, generator=gen)}
    targets = {"label": torch.tensor([0, 1, 2, 1, 0]), "value": torch.randn(5, 1, generator=gen)}
    combined = CombinedLoss(
        {"label": spec(type="cross_entropy"), "value": spec(type="mse", weight=0.25)}
    )
    total, each = combined(outputs, targets)
    ce = F.cross_entropy(outputs["label"], targets["label"])
    mse = F.mse_loss(outputs["value"], targets["value"])
    torch.testing.assert_close(each["label"], ce)
    torch.testing.assert_close(each["value"], mse)
    torch.testing.assert_close(total, ce + 0.25 * mse)
    assert isinstance(total, torch.Tensor) and total.dim() == 0


def test_combined_loss_accepts_outputs_named_like_module_attributes(gen):
    combined = CombinedLoss({"train": spec(type="mse"), "float": spec(type="l1")})
    out = {"train": torch.zeros(2, 1), "float": torch.ones(2, 1)}
    total, _ = combined(out, {"train": torch.ones(2, 1), "float": torch.ones(2, 1)})
    assert total.item() == pytest.approx(1.0)


def test_combined_loss_backpropagates(gen):
    weight = torch.randn(3, 2, generator=gen, requires_grad=True)
    combined = CombinedLoss({"output": spec(type="cross_entropy")})
    total, _ = combined(
        {"output": torch.randn(4, 3, generator=gen) @ weight},
        {"output": torch.tensor([0, 1, 1, 0])},
    )
    total.backward()
    assert weight.grad is not None


# -------------------------------------------------------------- fit checks


def labels(shape=(), num_classes=None, dtype="int64") -> FieldInfo:
    return FieldInfo(shape, dtype, num_classes)


def floats(shape=()) -> FieldInfo:
    return FieldInfo(shape, "float32")


@pytest.mark.parametrize(
    ("loss_spec", "output_shape", "target"),
    [
        ({"type": "cross_entropy"}, (10,), labels((), 10)),
        ({"type": "cross_entropy"}, (10,), labels((1,), 10)),  # an (N, 1) label array
        ({"type": "cross_entropy"}, (10,), floats((10,))),  # probabilities
        ({"type": "cross_entropy"}, (3, 8, 8), labels((8, 8), 3, "uint8")),
        ({"type": "cross_entropy", "class_weights": [1, 2, 3]}, (3,), labels((), 3)),
        ({"type": "cross_entropy", "label_smoothing": 0.1}, (10,), None),
        ({"type": "nll", "class_weights": [1, 2]}, (2,), labels((), 2)),
        ({"type": "bce_with_logits"}, (1,), labels((), 2)),
        ({"type": "bce_with_logits", "pos_weight": [1, 2, 3]}, (3,), floats((3,))),
        ({"type": "bce"}, (4,), FieldInfo((4,), "bool")),
        ({"type": "mse"}, (1,), floats(())),
        ({"type": "mse"}, (), floats(())),
        ({"type": "l1"}, (), floats((1,))),
        ({"type": "huber", "delta": 2.0}, (3, 2), labels((3, 2))),
        ({"type": "smooth_l1", "beta": 0.5}, (2,), None),
    ],
)
def test_loss_fits(loss_spec, output_shape, target):
    assert loss_fit_error(spec(**loss_spec), output_shape, target) is None


@pytest.mark.parametrize(
    ("loss_spec", "output_shape", "target", "words"),
    [
        (
            {"type": "cross_entropy"},
            (10,),
            labels((), 12),
            ["cross_entropy: output has 10 classes but targets hold labels up to 11"],
        ),
        ({"type": "cross_entropy"}, (), labels(()), ["class dimension", "(batch,)"]),
        ({"type": "cross_entropy"}, (1,), labels(()), ["at least 2 classes", "bce_with_logits"]),
        (
            {"type": "cross_entropy"},
            (10,),
            labels((3,)),
            ["(batch, 10)", "integer class labels of shape (batch,)", "target is (batch, 3) int64"],
        ),
        ({"type": "cross_entropy"}, (10,), floats(()), ["class labels must be integers"]),
        (
            {"type": "cross_entropy"},
            (10,),
            labels((10,)),
            ["integer class labels of shape (batch,)"],
        ),
        (
            {"type": "cross_entropy", "class_weights": [1, 2]},
            (3,),
            None,
            ["class_weights has 2 entries", "3 classes"],
        ),
        ({"type": "nll"}, (3,), floats((3,)), ["nll needs integer class labels", "cross_entropy"]),
        ({"type": "bce_with_logits"}, (1,), labels((), 5), ["labels up to 4", "cross_entropy"]),
        (
            {"type": "bce"},
            (2,),
            floats((3,)),
            ["bce", "(batch, 2)", "target is (batch, 3) float32"],
        ),
        (
            {"type": "bce_with_logits", "pos_weight": [1, 2]},
            (3,),
            floats((3,)),
            ["pos_weight has 2"],
        ),
        ({"type": "bce_with_logits", "pos_weight": [1, 2]}, (3,), None, ["needs 1 or 3"]),
        ({"type": "mse"}, (1,), floats((2,)), ["mse", "(batch, 1)", "(batch, 2)"]),
        ({"type": "mse"}, (4,), floats(()), ["same shape"]),
        ({"type": "mse"}, (1,), FieldInfo((), "object"), ["must be numbers", "object"]),
        ({"type": "mse", "label_smoothing": 0.1}, (1,), None, ["label_smoothing", "not mse"]),
        ({"type": "bce", "class_weights": [1.0]}, (1,), None, ["class_weights", "not bce"]),
        ({"type": "nll", "label_smoothing": 0.2}, (3,), None, ["label_smoothing", "not nll"]),
        ({"type": "mse", "pos_weight": 2.0}, (1,), None, ["pos_weight", "bce_with_logits only"]),
        ({"type": "huber", "beta": 0.5}, (1,), None, ["beta applies to smooth_l1 only"]),
    ],
)
def test_loss_misfit_says_what_and_why(loss_spec, output_shape, target, words):
    message = loss_fit_error(spec(**loss_spec), output_shape, target)
    assert message is not None
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_target_dtype_and_shape():
    ce, mse, bce = spec(type="cross_entropy"), spec(type="mse"), spec(type="bce_with_logits")
    assert target_dtype(ce, labels((), 3, "int32")) == torch.long
    assert target_dtype(ce, floats((3,))) == torch.float32
    assert target_dtype(bce, labels((), 2)) == torch.float32
    assert target_dtype(mse, labels(())) == torch.float32

    assert target_shape(ce, (3,), labels((1,), 3)) == ()
    assert target_shape(ce, (3, 4, 4), labels((4, 4), 3)) == (4, 4)
    assert target_shape(ce, (3,), floats((3,))) == (3,)
    assert target_shape(mse, (1,), floats(())) == (1,)
    assert target_shape(mse, (), floats((1,))) == ()
    assert target_shape(bce, (5,), floats((5,))) == (5,)
