"""The callbacks' decisions are pure functions: tested here without a trainer."""

import math

import pytest

from worker.engine.callbacks import (
    EarlyStopState,
    early_stopping_decision,
    is_improvement,
    nan_decision,
    top_k_decision,
)


@pytest.mark.parametrize(
    ("value", "best", "mode", "delta", "expected"),
    [
        (0.5, None, "min", 0.0, True),
        (0.4, 0.5, "min", 0.0, True),
        (0.5, 0.5, "min", 0.0, False),
        (0.45, 0.5, "min", 0.1, False),
        (0.6, 0.5, "max", 0.0, True),
        (0.55, 0.5, "max", 0.1, False),
        (math.nan, None, "min", 0.0, False),
        (math.nan, 0.5, "max", 0.0, False),
    ],
)
def test_is_improvement(value, best, mode, delta, expected):
    assert is_improvement(value, best, mode, delta) is expected


def run_early_stopping(values, **kwargs):
    state = EarlyStopState()
    for epoch, value in enumerate(values):
        state, stop, reason = early_stopping_decision(
            state, value, epoch, monitor="val_loss", **kwargs
        )
        if stop:
            return epoch, reason, state
    return None, None, state


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    epoch, reason, state = run_early_stopping([1.0, 0.8, 0.9, 0.85, 0.95], mode="min", patience=2)
    assert epoch == 4
    assert state.best == 0.8 and state.best_epoch == 1
    assert "did not improve for 3 epochs" in reason and "patience 2" in reason


def test_early_stopping_min_delta_ignores_tiny_gains():
    epoch, _, state = run_early_stopping(
        [1.0, 0.99, 0.985, 0.98], mode="min", patience=1, min_delta=0.05
    )
    assert epoch == 2
    assert state.best == 1.0


def test_early_stopping_waits_for_start_epoch():
    epoch, _, _ = run_early_stopping([1, 2, 3, 4, 5, 6], mode="min", patience=0, start_from_epoch=3)
    assert epoch == 4  # epoch 3 sets the best, epoch 4 fails to improve


def test_early_stopping_max_mode_keeps_going_while_improving():
    epoch, _, state = run_early_stopping([0.1, 0.2, 0.3, 0.4], mode="max", patience=0)
    assert epoch is None and state.best == 0.4 and state.wait == 0


def test_top_k_keeps_the_k_best_and_evicts_the_rest():
    kept: list = []
    saved, evicted_all = [], []
    for epoch, value in enumerate([0.5, 0.3, 0.4, 0.2, 0.6]):
        save, kept, evicted = top_k_decision(kept, value, epoch, k=2, mode="min")
        if save:
            saved.append(epoch)
        evicted_all += evicted
    assert kept == [(0.2, 3), (0.3, 1)]
    assert saved == [0, 1, 2, 3]
    assert sorted(evicted_all) == [0, 2]


def test_top_k_ties_keep_the_earlier_epoch():
    save, kept, _ = top_k_decision([(0.5, 0)], 0.5, 1, k=1, mode="max")
    assert not save and kept == [(0.5, 0)]


def test_top_k_zero_saves_nothing():
    assert top_k_decision([], 0.1, 0, k=0, mode="min") == (False, [], [])


def test_nan_decision_names_the_step():
    assert nan_decision(-1) == (False, "loss is finite")
    stop, reason = nan_decision(17)
    assert stop and reason == "loss became NaN or Inf at step 17"
