"""Optimizers and learning-rate schedules from the spec.

Every schedule is a torch scheduler behind one small interface, `LRSchedule`,
stepped after each optimizer step (`step_batch`) or after each epoch
(`step_epoch`), so the training loop need not know which kind it holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import lr_scheduler

from worker.engine.errors import SpecError
from worker.engine.spec import (
    CosineLRSpec,
    ExponentialLRSpec,
    MultiStepLRSpec,
    OneCycleLRSpec,
    OptimizerSpec,
    ReduceOnPlateauSpec,
    SchedulerSpec,
    StepLRSpec,
)

Interval = Literal["batch", "epoch"]


# The optimizers that have a fused CUDA step (torch.optim's `fused=True`).
FUSED = frozenset({"sgd", "adam", "adamw"})


def make_optimizer(spec: OptimizerSpec, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The torch optimizer the spec names, with its arguments; eps unset keeps torch's default."""
    params = list(params)
    if not params:
        raise SpecError.at("model", "the model has no parameters to train")
    eps: dict[str, Any] = {} if spec.eps is None else {"eps": spec.eps}
    common: dict[str, Any] = {"lr": spec.lr, "weight_decay": spec.weight_decay, "foreach": None}
    if spec.type in FUSED and all(p.is_cuda and p.is_floating_point() for p in params):
        # One kernel for the whole step, and the one path by which a grad scaler
        # (16-mixed) steps without reading its inf check back to the host each step.
        common["fused"] = True
    if spec.type == "sgd":
        return torch.optim.SGD(
            params,
            momentum=spec.momentum,
            dampening=spec.dampening,
            nesterov=spec.nesterov,
            **common,
        )
    if spec.type == "adam":
        return torch.optim.Adam(params, betas=spec.betas, amsgrad=spec.amsgrad, **eps, **common)
    if spec.type == "adamw":
        return torch.optim.AdamW(params, betas=spec.betas, amsgrad=spec.amsgrad, **eps, **common)
    if spec.type == "rmsprop":
        return torch.optim.RMSprop(
            params, alpha=spec.alpha, momentum=spec.momentum, **eps, **common
        )
    if spec.type == "adagrad":
        return torch.optim.Adagrad(params, lr_decay=spec.lr_decay, **eps, **common)
    raise ValueError(f"unknown optimizer {spec.type!r}")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(state)`, keeping the kernels this optimizer was built
    with: torch takes `fused`/`foreach` from the saved groups, so a last.pt written on
    the CPU would turn a CUDA optimizer's fused step off (and one written on a GPU
    would turn it on for the CPU). A fused step keeps its step counts on the device,
    the others on the CPU."""
    keys = ("fused", "foreach")
    kernels = [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, built in zip(optimizer.param_groups, kernels, strict=True):
        group.update(built)
        fused = bool(built.get("fused"))
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if isinstance(step, torch.Tensor):
                where = param.device if fused else torch.device("cpu")
                optimizer.state[param]["step"] = step.to(where)


class LRSchedule:
    """An lr schedule stepped per batch or per epoch; constant when `inner` is None."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        inner: lr_scheduler.LRScheduler | None = None,
        *,
        kind: str = "constant",
        interval: Interval = "epoch",
        monitor: str | None = None,
        stop_at: int | None = None,
    ):
        self.optimizer = optimizer
        self.inner = inner
        self.kind = kind
        self.interval: Interval = interval
        self.monitor = monitor
        self.stop_at = stop_at

    def step_batch(self) -> None:
        """After each optimizer step."""
        if self.inner is None or self.interval != "batch":
            return
        # OneCycleLR extrapolates its curve after the last planned step and
        # raises a step later; a run that takes more steps than planned keeps
        # the final lr instead.
        if self.stop_at is not None and self.inner.last_epoch >= self.stop_at:
            return
        self.inner.step()

    def step_epoch(self, metrics: dict[str, float]) -> None:
        """After each epoch, with that epoch's metrics (reduce_on_plateau reads its monitor)."""
        if self.inner is None or self.interval != "epoch":
            return
        if isinstance(self.inner, lr_scheduler.ReduceLROnPlateau):
            assert self.monitor is not None
            try:
                value = metrics[self.monitor]
            except KeyError:
                available = ", ".join(sorted(metrics)) or "none"
                raise ValueError(
                    f"scheduler.monitor '{self.monitor}' is not a metric of this run "
                    f"(available: {available})"
                ) from None
            self.inner.step(value)
        else:
            self.inner.step()

    @property
    def last_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """Numbers, strings, lists and dicts only: loadable with `torch.load(weights_only=True)`."""
        return {
            "kind": self.kind,
            "scheduler": None if self.inner is None else self.inner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(
                f"the saved schedule is {state.get('kind')!r}, this run's is {self.kind!r}"
            )
        if self.inner is not None:
            self.inner.load_state_dict(state["scheduler"])


def make_scheduler(
    spec: SchedulerSpec | None,
    optimizer: torch.optim.Optimizer,
    *,
    steps_per_epoch: int,
    epochs: int,
    max_steps: int | None = None,
) -> LRSchedule:
    """The schedule for `spec`; `steps_per_epoch` counts optimizer steps, not batches."""
    if spec is None:
        return LRSchedule(optimizer)
    if isinstance(spec, StepLRSpec):
        inner: lr_scheduler.LRScheduler = lr_scheduler.StepLR(
            optimizer, step_size=spec.step_size, gamma=spec.gamma
        )
        return LRSchedule(optimizer, inner, kind=spec.type, interval="epoch")
    if isinstance(spec, MultiStepLRSpec):
        inner = lr_scheduler.MultiStepLR(
            optimizer, milestones=sorted(spec.milestones), gamma=spec.gamma
        )
        return LRSchedule(optimizer, inner, kind=spec.type, interval="epoch")
    if isinstance(spec, ExponentialLRSpec):
        inner = lr_scheduler.ExponentialLR(optimizer, gamma=spec.gamma)
        return LRSchedule(optimizer, inner, kind=spec.type, interval="epoch")
    if isinstance(spec, ReduceOnPlateauSpec):
        inner = lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode=spec.mode,
            factor=spec.factor,
            patience=spec.patience,
            threshold=spec.threshold,
            cooldown=spec.cooldown,
            min_lr=spec.min_lr,
        )
        return LRSchedule(optimizer, inner, kind=spec.type, interval="epoch", monitor=spec.monitor)

    total = planned_steps(steps_per_epoch, epochs, max_steps)
    if isinstance(spec, CosineLRSpec):
        lambdas = [
            _warmup_cosine(total, spec.warmup_steps, spec.min_lr, group["lr"])
            for group in optimizer.param_groups
        ]
        # The lambdas are closures, so LambdaLR leaves them out of its state
        # (it saves None for each): the state stays weights_only-loadable and
        # a resumed run rebuilds them from the spec.
        inner = lr_scheduler.LambdaLR(optimizer, lambdas)
        return LRSchedule(optimizer, inner, kind=spec.type, interval="batch")
    if isinstance(spec, OneCycleLRSpec):
        inner = lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=spec.max_lr if spec.max_lr is not None else optimizer.param_groups[0]["lr"],
            total_steps=total,
            pct_start=spec.pct_start,
            anneal_strategy=spec.anneal_strategy,
            div_factor=spec.div_factor,
            final_div_factor=spec.final_div_factor,
            cycle_momentum=_has_momentum(optimizer),
        )
        # Step total - 1 is the curve's end (max_lr / div_factor / final_div_factor).
        return LRSchedule(optimizer, inner, kind=spec.type, interval="batch", stop_at=total - 1)
    raise ValueError(f"unknown scheduler {spec.type!r}")


def planned_steps(steps_per_epoch: int, epochs: int, max_steps: int | None = None) -> int:
    """Optimizer steps the run will take: all epochs, or fewer when max_steps stops it first."""
    total = steps_per_epoch * epochs
    if max_steps is not None:
        total = min(total, max_steps)
    if total < 1:
        raise ValueError(f"a per-batch schedule needs at least one step, found {total}")
    return total


def _warmup_cosine(
    total: int, warmup: int, min_lr: float, base_lr: float
) -> Callable[[int], float]:
    """lr factor at step s: linear from ~0 to 1 over `warmup` steps, cosine to min_lr at `total`."""
    if min_lr > base_lr:
        raise SpecError.at(
            "training.scheduler.min_lr", f"{min_lr} is above the optimizer's lr {base_lr}"
        )
    floor = min_lr / base_lr

    def factor(step: int) -> float:
        if step < warmup:
            # (s + 1) / (warmup + 1): never 0 (a wasted step), and reaches 1 at s == warmup.
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _has_momentum(optimizer: torch.optim.Optimizer) -> bool:
    """Whether OneCycleLR may cycle momentum: only where the user has some.

    torch cycles momentum by default, which would switch momentum on for SGD
    or RMSprop configured without it, and fails on optimizers lacking it.
    """
    group = optimizer.param_groups[0]
    return "betas" in group or group.get("momentum", 0.0) > 0
