"""Losses from `LossSpec`: does a loss fit an output, what targets it wants, the loss itself.

Shapes here are per sample (no batch dimension), as `FieldInfo` and the model's
`output_shapes` give them; messages show them with the batch dimension,
`(batch, 10)`, as a user sees their arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from worker.engine.fields import FieldInfo
from worker.engine.spec import LossSpec

CLASS_INDEX_LOSSES = frozenset({"cross_entropy", "nll"})
BINARY_LOSSES = frozenset({"bce", "bce_with_logits"})

# Options of LossSpec and the losses they belong to.
_OPTION_OWNERS: dict[str, frozenset[str]] = {
    "label_smoothing": frozenset({"cross_entropy"}),
    "class_weights": CLASS_INDEX_LOSSES,
    "pos_weight": frozenset({"bce_with_logits"}),
    "beta": frozenset({"smooth_l1"}),
    "delta": frozenset({"huber"}),
}


def show_shape(shape: tuple[int, ...]) -> str:
    """A per-sample shape as the user's arrays have it: () -> (batch,), (10,) -> (batch, 10)."""
    return "(" + ", ".join(["batch", *map(str, shape)]) + (",)" if not shape else ")")


def _show_target(target: FieldInfo) -> str:
    return f"target is {show_shape(target.shape)} {target.dtype}"


def _is_label_dtype(target: FieldInfo) -> bool:
    """Integer or bool: class indices for cross_entropy/nll, 0/1 for bce."""
    return target.is_integer or target.dtype == "bool"


def _same_or_single(output_shape: tuple[int, ...], target_shape_: tuple[int, ...]) -> bool:
    """Equal shapes, or one value per sample written as (1,) on one side and () on the other."""
    return output_shape == target_shape_ or {output_shape, target_shape_} == {(1,), ()}


def _option_errors(loss: LossSpec) -> list[str]:
    given = {
        "label_smoothing": loss.label_smoothing != 0.0,
        "class_weights": loss.class_weights is not None,
        "pos_weight": loss.pos_weight is not None,
        # beta/delta have defaults: only a value other than the default is a
        # mistake elsewhere (a stored spec repeats defaults it was never given).
        "beta": loss.beta != 1.0,
        "delta": loss.delta != 1.0,
    }
    errors = []
    for option, owners in _OPTION_OWNERS.items():
        if given[option] and loss.type not in owners:
            errors.append(
                f"{option} applies to {' and '.join(sorted(owners))} only, not {loss.type}"
            )
    return errors


def loss_fit_error(
    loss: LossSpec, output_shape: tuple[int, ...], target: FieldInfo | None
) -> str | None:
    """Why this loss cannot train this output against this target, in one line; None if it can."""
    name = loss.type
    out = f"output {show_shape(output_shape)}"
    options = _option_errors(loss)
    if options:
        return f"{name}: {'; '.join(options)}"

    if target is not None and not (target.is_integer or target.is_float or target.dtype == "bool"):
        return f"{name}: targets must be numbers, {_show_target(target)}"

    if name in CLASS_INDEX_LOSSES:
        if not output_shape:
            return (
                f"{name} needs an output with a class dimension, (batch, classes, ...), found {out}"
                f"; for one value per sample use bce_with_logits or mse"
            )
        classes = output_shape[0]
        if classes < 2:
            return (
                f"{name} needs at least 2 classes, found {out}; "
                f"for a single logit use bce_with_logits"
            )
        if loss.class_weights is not None and len(loss.class_weights) != classes:
            return (
                f"{name}: class_weights has {len(loss.class_weights)} entries "
                f"but the output has {classes} classes"
            )
        if target is None:
            return None
        index_shape = output_shape[1:]
        if _is_label_dtype(target):
            if target.shape not in (index_shape, (*index_shape, 1)):
                probs = f" or float probabilities of shape {show_shape(output_shape)}"
                return (
                    f"{name}: {out} needs integer class labels of shape {show_shape(index_shape)}"
                    f"{'' if name == 'nll' else probs}; {_show_target(target)}"
                )
            if target.num_classes is not None and target.num_classes > classes:
                return (
                    f"{name}: output has {classes} classes but targets hold labels "
                    f"up to {target.num_classes - 1}"
                )
            return None
        if name == "nll":
            return (
                f"nll needs integer class labels of shape {show_shape(index_shape)} for {out}; "
                f"{_show_target(target)} (for probability targets use cross_entropy)"
            )
        if target.shape != output_shape:
            return (
                f"{name}: float targets are class probabilities and must match {out}; "
                f"{_show_target(target)} (class labels must be integers)"
            )
        return None

    if isinstance(loss.pos_weight, list):
        width = output_shape[-1] if output_shape else 1
        if len(loss.pos_weight) not in (1, width):
            return (
                f"{name}: pos_weight has {len(loss.pos_weight)} entries; {out} needs 1 or {width}"
            )
    if target is None:
        return None
    if not _same_or_single(output_shape, target.shape):
        return f"{name}: {out} needs targets of the same shape; {_show_target(target)}"
    labels = target.num_classes if _is_label_dtype(target) else None
    if name in BINARY_LOSSES and labels is not None and labels > 2:
        return (
            f"{name} needs 0/1 targets but they hold labels up to {labels - 1}; "
            f"for {labels} classes use cross_entropy with a {labels}-unit output"
        )
    return None


def target_dtype(loss: LossSpec, target: FieldInfo) -> torch.dtype:
    """The dtype targets are loaded as: class labels are int64, everything else float32."""
    if loss.type in CLASS_INDEX_LOSSES and _is_label_dtype(target):
        return torch.long
    return torch.float32


def target_shape(
    loss: LossSpec, output_shape: tuple[int, ...], target: FieldInfo
) -> tuple[int, ...]:
    """The per-sample shape targets are reshaped to, so the loss never broadcasts by accident."""
    if loss.type in CLASS_INDEX_LOSSES and _is_label_dtype(target):
        return output_shape[1:]
    return output_shape


class Loss(nn.Module):
    """One output's loss: (output, target) -> scalar mean, computed in float32.

    Wraps the torch.nn loss; its class weights and pos_weight are buffers, so
    `.to(device)` moves them.
    """

    def __init__(self, spec: LossSpec):
        super().__init__()
        self.spec = spec
        self.class_indices = spec.type in CLASS_INDEX_LOSSES
        self.fn = _torch_loss(spec)

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        # Losses are reduced in float32 whatever the autocast dtype: a sum over
        # a batch in bf16 loses digits, and CUDA refuses binary_cross_entropy
        # under autocast altogether.
        if output.dtype in (torch.float16, torch.bfloat16):
            output = output.float()
        labels = self.class_indices and not target.is_floating_point()
        if not labels:
            if target.dtype != output.dtype:
                target = target.to(output.dtype)
            # (batch,) against (batch, 1) would broadcast to (batch, batch) silently.
            if target.shape != output.shape:
                target = target.reshape(output.shape)
        device_type = output.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self.fn(output, target)
        return self.fn(output, target)

    def extra_repr(self) -> str:
        return self.spec.type


def _torch_loss(spec: LossSpec) -> nn.Module:
    weight = (
        torch.tensor(spec.class_weights, dtype=torch.float32)
        if spec.class_weights is not None
        else None
    )
    if spec.type == "cross_entropy":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=spec.label_smoothing)
    if spec.type == "nll":
        return nn.NLLLoss(weight=weight)
    if spec.type == "bce":
        return nn.BCELoss()
    if spec.type == "bce_with_logits":
        pos_weight = None
        if spec.pos_weight is not None:
            values = spec.pos_weight if isinstance(spec.pos_weight, list) else [spec.pos_weight]
            pos_weight = torch.tensor(values, dtype=torch.float32)
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    if spec.type == "mse":
        return nn.MSELoss()
    if spec.type == "l1":
        return nn.L1Loss()
    if spec.type == "smooth_l1":
        return nn.SmoothL1Loss(beta=spec.beta)
    if spec.type == "huber":
        return nn.HuberLoss(delta=spec.delta)
    raise ValueError(f"unknown loss {spec.type!r}")


def make_loss(loss: LossSpec) -> nn.Module:
    """(output, target) -> scalar mean loss."""
    return Loss(loss)


class CombinedLoss(nn.Module):
    """Several outputs' losses: total = sum(weight * loss), plus each output's own loss.

    Returns tensors only, so a training step never waits on the device.
    """

    def __init__(self, losses: Mapping[str, LossSpec]):
        super().__init__()
        self.names = list(losses)
        self.weights = [losses[name].weight for name in self.names]
        # A ModuleList, not a ModuleDict: an output may be named like a Module
        # attribute ("train", "float"), which ModuleDict refuses.
        self.losses = nn.ModuleList(make_loss(losses[name]) for name in self.names)

    def forward(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        per_output: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name, weight, fn in zip(self.names, self.weights, self.losses, strict=True):
            value = fn(outputs[name], targets[name])
            per_output[name] = value
            term = value if weight == 1.0 else value * weight
            total = term if total is None else total + term
        assert total is not None, "CombinedLoss needs at least one output"
        return total, per_output
