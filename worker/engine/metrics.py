"""Epoch metrics, accumulated on the device: no host sync per step, one at the end of the epoch.

Names follow Keras: with one output `loss`, `accuracy`, `val_loss`, ...; with
several, the total `loss` plus `<output>_loss`, `<output>_accuracy`, ... Every
value is a mean over the samples (or elements) of the epoch, weighted by batch
size, so the last, smaller batch counts for what it holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from worker.engine.losses import BINARY_LOSSES, CLASS_INDEX_LOSSES, show_shape
from worker.engine.spec import JobSpec, LossSpec, MetricSpec

EXTRA_METRICS = ("lr", "epoch_time_s", "samples_per_s")

SlotKind = Literal["total_loss", "loss", "accuracy", "top_k_accuracy", "mae", "mse", "rmse"]


@dataclass(frozen=True)
class _Slot:
    """One reported value: its name (without prefix), the output it reads, how to compute it."""

    name: str
    kind: SlotKind
    output: str = ""  # "" for the total loss
    loss: str = ""  # the output's loss type, which picks the accuracy rule
    metric: MetricSpec | None = None

    @property
    def k(self) -> int:
        return self.metric.k if self.metric is not None else 1


def metric_fit_error(
    metric: MetricSpec, loss: LossSpec, output_shape: tuple[int, ...] | None = None
) -> str | None:
    """Why this metric cannot be computed for an output trained with this loss; None if it can."""
    kind = metric.type
    if kind == "accuracy" and loss.type not in CLASS_INDEX_LOSSES | BINARY_LOSSES:
        return (
            f"accuracy needs a classification loss (cross_entropy, nll, bce, bce_with_logits), "
            f"the output uses {loss.type}"
        )
    if kind == "top_k_accuracy":
        if loss.type not in CLASS_INDEX_LOSSES:
            return f"top_k_accuracy needs cross_entropy or nll, the output uses {loss.type}"
        if output_shape and metric.k > output_shape[0]:
            return (
                f"top_{metric.k}_accuracy needs at least {metric.k} classes, "
                f"the output is {show_shape(output_shape)}"
            )
    if kind in ("mae", "mse", "rmse") and loss.type in CLASS_INDEX_LOSSES:
        return f"{kind} compares values, but the output holds class scores ({loss.type})"
    return None


def _slots(spec: JobSpec) -> list[_Slot]:
    outputs = spec.output_names
    losses = spec.training.losses(outputs)
    metrics = spec.training.metrics_for(outputs)
    single = len(outputs) == 1
    slots = [_Slot("loss", "total_loss")]
    for out in outputs:
        loss = losses.get(out)
        if loss is None:
            raise ValueError(f"training.loss names no loss for output '{out}'")
        if not single:
            slots.append(_Slot(f"{out}_loss", "loss", out, loss.type))
        for metric in metrics[out]:
            name = metric.key if single else f"{out}_{metric.key}"
            if any(s.name == name for s in slots):
                continue  # the same metric listed twice
            slots.append(_Slot(name, metric.type, out, loss.type, metric))
    return slots


def metric_names(spec: JobSpec) -> list[str]:
    """Every metric name a monitor may use, in report order."""
    names = [slot.name for slot in _slots(spec)]
    if spec.data.validation is not None:
        names += [f"val_{name}" for name in names]
    return [*names, *EXTRA_METRICS]


class MetricAccumulator:
    """Sums of losses and metrics over an epoch, kept on the device.

    `update()` only queues device work (no `.item()`, no branching on values);
    `compute()` reads every sum in one transfer.
    """

    def __init__(self, spec: JobSpec, *, prefix: str = "", device: torch.device | str = "cpu"):
        self.prefix = prefix
        self.device = torch.device(device)
        self._slots = _slots(spec)
        losses = spec.training.losses(spec.output_names)
        for slot in self._slots:
            if slot.metric is not None:
                error = metric_fit_error(slot.metric, losses[slot.output])
                if error is not None:
                    raise ValueError(f"metric {slot.name}: {error}")
        # float64 keeps counts of correct predictions exact past 2**24 elements;
        # MPS has no float64.
        self._dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._sums = torch.zeros(len(self._slots), dtype=self._dtype, device=self.device)
        self._cells = list(self._sums.unbind(0))  # views, zeroed with _sums by reset()
        # Counts depend on shapes only, so they stay on the host at no cost.
        self._counts = [0] * len(self._slots)

    @property
    def names(self) -> list[str]:
        return [self.prefix + slot.name for slot in self._slots]

    def reset(self) -> None:
        # In place: a tensor made under inference_mode (validation) could not
        # be updated in place outside it later.
        self._sums.zero_()
        self._counts = [0] * len(self._slots)

    @torch.no_grad()
    def update(
        self,
        outputs: dict[str, Tensor],
        targets: dict[str, Tensor],
        losses: dict[str, Tensor],
        total_loss: Tensor,
        batch_size: int,
    ) -> None:
        # One in-place add per slot into its cell of the sums (computed in the
        # sums' dtype): no stack, no temporaries, two tiny kernels fewer per slot.
        for i, (slot, cell) in enumerate(zip(self._slots, self._cells, strict=True)):
            if slot.kind == "total_loss":
                cell.add_(total_loss.detach(), alpha=batch_size)
                count = batch_size
            elif slot.kind == "loss":
                cell.add_(losses[slot.output].detach(), alpha=batch_size)
                count = batch_size
            else:
                output = outputs[slot.output].detach()
                value, count = _metric_sum(slot, output, targets[slot.output])
                cell.add_(value)
            self._counts[i] += count

    def state_dict(self) -> dict[str, Any]:
        """The sums so far: a run stopped mid-epoch resumes them, and its epoch means stay exact."""
        return {"sums": self._sums.detach().cpu().clone(), "counts": list(self._counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums.copy_(state["sums"].to(self._sums.device, self._sums.dtype))
        self._counts = [int(c) for c in state["counts"]]

    def compute(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Sample-weighted means over everything since `reset()`; NaN for a value never updated.

        `reduce` sums a tensor over the ranks of a data-parallel run, in place: the means
        are then over every rank's samples, as one process over the global batch gives."""
        sums, counts = self._sums, self._counts
        if reduce is not None:
            both = torch.cat([sums, torch.tensor(counts, dtype=sums.dtype, device=sums.device)])
            reduced = reduce(both).tolist()  # the one host sync
            values, counts = reduced[: len(counts)], [int(c) for c in reduced[len(counts) :]]
        else:
            values = sums.tolist()  # the one host sync
        result: dict[str, float] = {}
        for slot, total, count in zip(self._slots, values, counts, strict=True):
            mean = total / count if count else math.nan
            result[self.prefix + slot.name] = math.sqrt(mean) if slot.kind == "rmse" else mean
        return result


def _metric_sum(slot: _Slot, output: Tensor, target: Tensor) -> tuple[Tensor, int]:
    """(sum over the batch, number of elements summed) for one metric of one output."""
    if slot.kind in ("accuracy", "top_k_accuracy") and slot.loss in CLASS_INDEX_LOSSES:
        labels = _class_labels(output, target)
        if slot.kind == "accuracy":
            correct = output.argmax(dim=1) == labels
        else:
            k = min(slot.k, output.shape[1])
            top = output.topk(k, dim=1).indices
            correct = (top == labels.unsqueeze(1)).any(dim=1)
        return correct.sum(), labels.numel()
    target = target.reshape(output.shape)
    if slot.kind == "accuracy":  # a binary loss: one decision per element
        threshold = 0.0 if slot.loss == "bce_with_logits" else 0.5
        # Targets above 0.5 are positives, so smoothed labels (0.1/0.9) still count.
        correct = (output > threshold) == (target > 0.5)
        return correct.sum(), output.numel()
    values = output.float()
    if slot.loss == "bce_with_logits":
        values = values.sigmoid()  # compare probabilities, not logits, with 0/1 targets
    diff = values - target.to(values.dtype)
    if slot.kind == "mae":
        return diff.abs().sum(), diff.numel()
    return diff.square().sum(), diff.numel()  # mse; rmse is its square root at the end


def _class_labels(output: Tensor, target: Tensor) -> Tensor:
    """Integer labels of shape (batch, ...) from labels or from class probabilities."""
    if target.is_floating_point() and target.dim() == output.dim():
        return target.argmax(dim=1)
    return target.reshape(output.shape[:1] + output.shape[2:])
