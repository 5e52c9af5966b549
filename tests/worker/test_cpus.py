"""`torchyard worker --cpus`: the CPU list it takes, and a worker that refuses a set
it may not run on (the real command, before it starts Celery)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.cpus import format_cpu_list, parse_cpu_list

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", {0}), ("3", {3}), ("0-3", {0, 1, 2, 3}), ("0-1,8,10-11", {0, 1, 8, 10, 11})],
)
def test_a_cpu_list_reads_as_taskset_reads_it_and_prints_back(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus
    assert format_cpu_list(cpus) == text


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "expected CPU numbers and ranges"),
        ("a", "expected CPU numbers and ranges"),
        ("1-", "expected CPU numbers and ranges"),
        ("-1", "expected CPU numbers and ranges"),
        ("0,,1", "expected CPU numbers and ranges"),
        ("3-1", "the range 3-1 runs backwards"),
    ],
)
def test_a_bad_cpu_list_says_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_cpu_list(text)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
@pytest.mark.parametrize("how", ["flag", "environment"])
def test_a_worker_refuses_cpus_it_may_not_run_on(how: str) -> None:
    missing = (os.cpu_count() or 1) + 1  # past the last CPU the machine has
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "app.cli", "worker"]
    if how == "flag":
        argv += ["--cpus", f"0,{missing}"]
    else:
        env["TORCHYARD_WORKER_CPUS"] = f"0,{missing}"
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"--cpus 0,{missing}: CPU {missing} is not one this worker may run on" in done.stderr
    online = Path("/sys/devices/system/cpu/online").read_text().strip()
    assert f"(the machine's CPUs: {online};" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux CPU affinity and two CPUs",
)
def test_a_worker_may_take_cpus_its_parent_narrowed_away() -> None:
    """A worker started from a pinned process (a benchmark, `serve` keeping its API
    off the training's CPUs) still gets the set it names."""
    low, high = min(os.sched_getaffinity(0)), max(os.sched_getaffinity(0))
    done = subprocess.run(
        [sys.executable, "-c", f"from worker.cpus import pin_worker; print(pin_worker('{low}'))"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=lambda: os.sched_setaffinity(0, {high}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{{{low}}}"
