"""Optimizers and LR schedules: arguments reach torch, curves as expected, resume exactly."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from pydantic import TypeAdapter
from torch import nn

from worker.engine.optim import LRSchedule, load_optimizer_state, make_optimizer, make_scheduler
from worker.engine.spec import OptimizerSpec, SchedulerSpec

SCHEDULER = TypeAdapter(SchedulerSpec)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def optimizer(lr: float = 0.1, **kwargs) -> torch.optim.Optimizer:
    return make_optimizer(OptimizerSpec(type="sgd", lr=lr, **kwargs), model().parameters())


def schedule(doc: dict, opt: torch.optim.Optimizer, **kwargs) -> LRSchedule:
    kwargs.setdefault("steps_per_epoch", 4)
    kwargs.setdefault("epochs", 5)
    return make_scheduler(SCHEDULER.validate_python(doc), opt, **kwargs)


def epoch_lrs(sched: LRSchedule, epochs: int, metrics=lambda epoch: {}) -> list[float]:
    """lr in force during each epoch, stepping as the trainer does."""
    lrs = []
    for epoch in range(epochs):
        lrs.append(sched.last_lr)
        sched.optimizer.step()
        sched.step_batch()
        sched.step_epoch(metrics(epoch))
    return lrs


def step_lrs(sched: LRSchedule, steps: int) -> list[float]:
    """lr used by each optimizer step."""
    lrs = []
    for _ in range(steps):
        lrs.append(sched.last_lr)
        sched.optimizer.step()
        sched.step_batch()
    return lrs


# -------------------------------------------------------------- optimizers


@pytest.mark.parametrize(
    ("doc", "cls", "expected"),
    [
        (
            {"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
            torch.optim.SGD,
            {"lr": 0.05, "momentum": 0.9, "nesterov": True, "dampening": 0.0, "weight_decay": 1e-4},
        ),
        (
            {"type": "sgd", "momentum": 0.5, "dampening": 0.1},
            torch.optim.SGD,
            {"momentum": 0.5, "dampening": 0.1, "nesterov": False},
        ),
        (
            {"type": "adam", "lr": 3e-4, "betas": [0.8, 0.99], "eps": 1e-6, "amsgrad": True},
            torch.optim.Adam,
            {"lr": 3e-4, "betas": (0.8, 0.99), "eps": 1e-6, "amsgrad": True, "weight_decay": 0.0},
        ),
        ({"type": "adam"}, torch.optim.Adam, {"lr": 1e-3, "eps": 1e-8}),
        (
            {"type": "adamw", "weight_decay": 0.05},
            torch.optim.AdamW,
            {"weight_decay": 0.05, "betas": (0.9, 0.999)},
        ),
        (
            {"type": "rmsprop", "alpha": 0.9, "momentum": 0.3, "eps": 1e-5},
            torch.optim.RMSprop,
            {"alpha": 0.9, "momentum": 0.3, "eps": 1e-5},
        ),
        ({"type": "rmsprop"}, torch.optim.RMSprop, {"eps": 1e-8, "momentum": 0.0}),
        (
            {"type": "adagrad", "lr_decay": 0.01, "weight_decay": 0.1},
            torch.optim.Adagrad,
            {"lr_decay": 0.01, "weight_decay": 0.1, "eps": 1e-10},
        ),
    ],
)
def test_optimizer_builds_with_its_arguments(doc, cls, expected):
    opt = make_optimizer(OptimizerSpec.model_validate(doc), model().parameters())
    assert type(opt) is cls
    group = opt.param_groups[0]
    for key, value in expected.items():
        assert group[key] == value, key
    assert group["foreach"] is None
    assert len(group["params"]) == 2


def test_cpu_parameters_get_torchs_default_kernels_not_the_fused_step():
    # fused=True is for CUDA parameters (one kernel a step; a grad scaler that never
    # reads its inf check back to the host); the CPU keeps the bit-exact default path.
    for kind in ("sgd", "adam", "adamw"):
        opt = make_optimizer(OptimizerSpec(type=kind), model().parameters())
        assert not opt.param_groups[0]["fused"], kind


def _stepped(opt_type: str, fused: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = model()
    opt = getattr(torch.optim, opt_type)(net.parameters(), lr=0.1, fused=fused)
    net(torch.ones(4, 3)).square().mean().backward()
    opt.step()
    return net, opt


@pytest.mark.parametrize("opt_type", ["Adam", "AdamW", "SGD"])
@pytest.mark.parametrize("saved_fused", [False, True])
def test_a_loaded_state_keeps_the_kernels_the_optimizer_was_built_with(opt_type, saved_fused):
    # torch's own load_state_dict takes `fused` from the saved groups: a last.pt from
    # a CPU run would switch a GPU run's fused step off, and a GPU one would switch it
    # on for the CPU. (CPU has fused Adam/AdamW/SGD too, so both ways run here.)
    _, saved = _stepped(opt_type, fused=saved_fused)
    state = saved.state_dict()
    net, opt = _stepped(opt_type, fused=not saved_fused)
    load_optimizer_state(opt, state)
    assert bool(opt.param_groups[0]["fused"]) is (not saved_fused)
    assert opt.param_groups[0]["lr"] == 0.1
    for param in net.parameters():
        step = opt.state[param].get("step")
        if step is not None:
            assert float(step) == 1.0
    net(torch.ones(4, 3)).square().mean().backward()
    opt.step()  # the built kernel runs on the loaded state


def test_loading_keeps_a_kernel_key_the_optimizer_never_had_out():
    net = model()
    opt = make_optimizer(OptimizerSpec(type="rmsprop"), net.parameters())
    load_optimizer_state(opt, opt.state_dict())
    assert "fused" not in opt.param_groups[0]


def test_optimizer_without_parameters_is_refused():
    with pytest.raises(ValueError, match="no parameters"):
        make_optimizer(OptimizerSpec(), [])


# -------------------------------------------------------------- schedules


def test_no_scheduler_keeps_lr_constant():
    sched = make_scheduler(None, optimizer(0.1), steps_per_epoch=3, epochs=2)
    assert epoch_lrs(sched, 4) == [0.1] * 4
    assert sched.state_dict() == {"kind": "constant", "scheduler": None}


def test_step_decays_every_step_size_epochs():
    sched = schedule({"type": "step", "step_size": 2, "gamma": 0.5}, optimizer(0.8))
    assert sched.interval == "epoch"
    assert epoch_lrs(sched, 6) == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.2])


def test_multistep_decays_at_milestones():
    sched = schedule({"type": "multistep", "milestones": [3, 1], "gamma": 0.1}, optimizer(1.0))
    assert epoch_lrs(sched, 5) == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])


def test_exponential_decays_every_epoch():
    sched = schedule({"type": "exponential", "gamma": 0.5}, optimizer(1.0))
    assert epoch_lrs(sched, 4) == pytest.approx([1.0, 0.5, 0.25, 0.125])


def test_epoch_schedules_ignore_batch_steps():
    sched = schedule({"type": "step", "step_size": 1}, optimizer(1.0))
    for _ in range(10):
        sched.step_batch()
    assert sched.last_lr == 1.0


def test_cosine_warms_up_linearly_then_decays_to_min_lr():
    lr, min_lr, warmup, total = 0.1, 0.01, 4, 20
    sched = schedule(
        {"type": "cosine", "warmup_steps": warmup, "min_lr": min_lr},
        optimizer(lr),
        steps_per_epoch=5,
        epochs=4,
    )
    assert sched.interval == "batch"
    lrs = step_lrs(sched, total)
    assert lrs[:warmup] == pytest.approx([lr * (s + 1) / (warmup + 1) for s in range(warmup)])
    assert lrs[warmup] == pytest.approx(lr)
    expected = [
        min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        for s in range(warmup, total)
    ]
    assert lrs[warmup:] == pytest.approx(expected)
    assert all(a > b for a, b in itertools.pairwise(lrs[warmup:]))
    assert sched.last_lr == pytest.approx(min_lr)  # after the last step
    sched.step_batch()
    assert sched.last_lr == pytest.approx(min_lr)  # and stays there


def test_cosine_ends_at_max_steps_when_that_comes_first():
    sched = schedule(
        {"type": "cosine", "min_lr": 0.0},
        optimizer(1.0),
        steps_per_epoch=10,
        epochs=10,
        max_steps=8,
    )
    lrs = step_lrs(sched, 8)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[4] == pytest.approx(0.5)
    assert sched.last_lr == pytest.approx(0.0, abs=1e-12)


def test_cosine_min_lr_above_lr_is_refused():
    with pytest.raises(ValueError, match="min_lr"):
        schedule({"type": "cosine", "min_lr": 1.0}, optimizer(0.1))


def test_epoch_steps_do_not_move_a_batch_schedule():
    sched = schedule({"type": "cosine"}, optimizer(1.0))
    sched.step_epoch({})
    assert sched.last_lr == 1.0


def test_onecycle_rises_to_max_lr_then_anneals_below_start():
    opt = make_optimizer(OptimizerSpec(type="adamw", lr=0.01), model().parameters())
    sched = schedule(
        {
            "type": "onecycle",
            "max_lr": 0.5,
            "pct_start": 0.25,
            "div_factor": 10,
            "final_div_factor": 100,
        },
        opt,
        steps_per_epoch=10,
        epochs=4,
    )
    lrs = step_lrs(sched, 40)
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(0.05)  # max_lr / div_factor
    assert max(lrs) == pytest.approx(0.5)
    assert peak == pytest.approx(0.25 * 40, abs=1)
    assert lrs[-1] == pytest.approx(0.05 / 100)  # the last step ends the curve
    assert all(a <= b for a, b in itertools.pairwise(lrs[: peak + 1]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[peak:]))
    for _ in range(3):  # steps past the plan keep the final lr instead of raising
        sched.step_batch()
        assert sched.last_lr == pytest.approx(0.05 / 100)


def test_onecycle_default_max_lr_is_the_optimizers_lr():
    sched = schedule({"type": "onecycle"}, optimizer(0.2), steps_per_epoch=5, epochs=2)
    assert max(step_lrs(sched, 10)) == pytest.approx(0.2)


def test_onecycle_leaves_momentum_off_when_the_user_has_none():
    opt = optimizer(0.1)  # sgd, momentum 0
    sched = schedule({"type": "onecycle"}, opt, steps_per_epoch=5, epochs=2)
    step_lrs(sched, 5)
    assert opt.param_groups[0]["momentum"] == 0.0

    with_momentum = optimizer(0.1, momentum=0.9)
    sched = schedule({"type": "onecycle"}, with_momentum, steps_per_epoch=5, epochs=2)
    step_lrs(sched, 2)
    assert with_momentum.param_groups[0]["momentum"] != 0.9  # cycled, as 1cycle intends


def test_reduce_on_plateau_lowers_lr_after_patience_epochs_without_improvement():
    sched = schedule(
        {"type": "reduce_on_plateau", "monitor": "val_loss", "patience": 2, "factor": 0.5},
        optimizer(1.0),
    )
    losses = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.5, 0.5]
    lrs = epoch_lrs(sched, len(losses), lambda epoch: {"val_loss": losses[epoch]})
    # torch's rule: best 0.9 at epoch 1; epochs 2 and 3 are the patience, and the
    # third epoch without improvement (4) cuts the lr; the count restarts after a cut.
    assert lrs == pytest.approx([1.0] * 5 + [0.5] * 3 + [0.25] * 3)


def test_reduce_on_plateau_max_mode_and_min_lr():
    sched = schedule(
        {
            "type": "reduce_on_plateau",
            "monitor": "val_accuracy",
            "mode": "max",
            "patience": 0,
            "min_lr": 0.3,
        },
        optimizer(1.0),
    )
    lrs = epoch_lrs(sched, 4, lambda epoch: {"val_accuracy": 0.5})
    assert lrs == pytest.approx([1.0, 1.0, 0.3, 0.3])  # the 0.1 cut is clamped at min_lr


def test_reduce_on_plateau_missing_metric_names_it_and_the_available_ones():
    sched = schedule({"type": "reduce_on_plateau"}, optimizer())
    with pytest.raises(ValueError, match=r"'val_loss'.*available: loss, lr"):
        sched.step_epoch({"loss": 1.0, "lr": 0.1})


# ------------------------------------------------------------------ resume

RESUMABLE = [
    ({"type": "step", "step_size": 2, "gamma": 0.5}, "sgd"),
    ({"type": "multistep", "milestones": [2, 5]}, "sgd"),
    ({"type": "exponential", "gamma": 0.9}, "adam"),
    ({"type": "cosine", "warmup_steps": 3, "min_lr": 1e-4}, "adamw"),
    ({"type": "onecycle", "anneal_strategy": "linear"}, "adam"),
    ({"type": "reduce_on_plateau", "patience": 1, "cooldown": 1}, "rmsprop"),
    (None, "adagrad"),
]


def _trainer_like_run(doc, opt_type, *, epochs, start_state=None, start_epoch=0):
    """Build model, optimizer and schedule from the spec, optionally load a saved state, train."""
    net = model()
    opt = make_optimizer(OptimizerSpec(type=opt_type, lr=0.05), net.parameters())
    spec = None if doc is None else SCHEDULER.validate_python(doc)
    sched = make_scheduler(spec, opt, steps_per_epoch=3, epochs=8)
    if start_state is not None:
        net.load_state_dict(start_state["model"])
        opt.load_state_dict(start_state["optimizer"])
        sched.load_state_dict(start_state["scheduler"])
    x = torch.linspace(-1, 1, 12).reshape(4, 3)
    lrs = []
    for epoch in range(start_epoch, epochs):
        for _ in range(3):
            lrs.append(sched.last_lr)
            loss = net(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step_batch()
        # a plateau at epochs 2..4, then improvement
        val_loss = [1.0, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7][epoch]
        sched.step_epoch({"val_loss": val_loss, "loss": val_loss})
    state = {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
    }
    return lrs, state


@pytest.mark.parametrize(("doc", "opt_type"), RESUMABLE)
def test_resume_from_weights_only_state_continues_like_an_uninterrupted_run(doc, opt_type):
    uninterrupted, _ = _trainer_like_run(doc, opt_type, epochs=8)
    first, state = _trainer_like_run(doc, opt_type, epochs=3)

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    rest, _ = _trainer_like_run(doc, opt_type, epochs=8, start_state=loaded, start_epoch=3)
    assert first + rest == uninterrupted
    assert len(set(uninterrupted)) > 1 or doc is None  # the schedule did move


def test_loading_another_schedules_state_is_refused():
    step = schedule({"type": "step", "step_size": 1}, optimizer())
    cosine = schedule({"type": "cosine"}, optimizer())
    with pytest.raises(ValueError, match="saved schedule is 'step'"):
        cosine.load_state_dict(step.state_dict())
