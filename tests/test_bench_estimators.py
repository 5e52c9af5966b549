"""The watch-overhead benchmark's paired estimator: a drift of the machine cancels, a
real slowdown of the observed blocks does not."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def watch_overhead() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("watch_overhead", BENCH / "watch_overhead.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["watch_overhead"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def blocks(module: ModuleType, slowdown: float, drift: float, n: int = 20) -> list:
    """Blocks unobserved/observed in turn; epoch time 1.0, growing by `drift` per block
    (the machine), observed ones `slowdown` times slower."""
    out = []
    for k in range(n):
        observed = k % 2 == 1
        base = (1.0 + drift * k) * (slowdown if observed else 1.0)
        out.append(
            module.Block(observed=observed, start=5.0 * k, epoch_times=[base * 0.99, base, base])
        )
    return out


def test_a_linear_drift_cancels(watch_overhead: ModuleType) -> None:
    drifting = blocks(watch_overhead, slowdown=1.0, drift=0.02)
    ratios = watch_overhead.paired_ratios(drifting)
    assert len(ratios) == 10  # every observed block; the last has one neighbour
    # all but the last (one neighbour, before it) are exactly 1
    assert ratios[:-1] == pytest.approx([1.0] * 9)
    # pooling all epochs of each kind is fooled by it (each observed block comes later)
    pooled = [
        statistics.median(t for b in drifting if b.observed == kind for t in b.epoch_times)
        for kind in (True, False)
    ]
    assert pooled[0] / pooled[1] > 1.01


def test_a_slowdown_is_measured(watch_overhead: ModuleType) -> None:
    ratios = watch_overhead.paired_ratios(blocks(watch_overhead, slowdown=1.05, drift=0.0))
    assert ratios == pytest.approx([1.05] * 10)
    low, high = watch_overhead.mean_interval(ratios)
    assert low == pytest.approx(1.05) and high == pytest.approx(1.05)


def test_blocks_without_epochs_are_left_out(watch_overhead: ModuleType) -> None:
    some = blocks(watch_overhead, slowdown=1.02, drift=0.0, n=6)
    some[2].epoch_times = []  # an unobserved block: its observed neighbours use the other side
    some[5].epoch_times = []  # an observed block: no ratio
    ratios = watch_overhead.paired_ratios(some)
    assert ratios == pytest.approx([1.02, 1.02])


def test_the_interval_holds_the_mean(watch_overhead: ModuleType) -> None:
    ratios = [0.99, 1.01, 1.02, 1.00, 0.98, 1.03, 1.01]
    low, high = watch_overhead.mean_interval(ratios)
    assert low < sum(ratios) / len(ratios) < high
    assert low >= 0.98 and high <= 1.03
