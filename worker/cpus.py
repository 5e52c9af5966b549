"""`torchyard worker --cpus 0-3`: the CPUs a worker and its training children run on.

On a machine that also runs the API, its database or a browser, the kernel wakes
their threads on whatever core it likes, the training's included. Training runs
undisturbed only on CPUs of its own with the rest kept off them: `serve
--worker-cpus` does both (its API moves to the other CPUs: `keep_off`); a worker
started alone pins itself, and the API and the database need the other CPUs given
to them (taskset, compose's cpuset). Pinning the worker alone does not help
(bench/README.md, "dashboard").

The set is the worker's own affinity (sched_setaffinity), which its training
children, their DataLoader workers and data-parallel ranks inherit; torch sizes its
thread pool to it (one thread a CPU, unless OMP_NUM_THREADS says otherwise), and a
job's log names it. Kubernetes' static CPU manager and docker's `cpuset` give a
container the same. Linux only (macOS has no CPU affinity).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# The Linux cpulist format (`taskset -c`, /sys/.../cpulist): 0-3,8,10-11.


def parse_cpu_list(text: str) -> set[int]:
    """`0-3,8` -> {0, 1, 2, 3, 8}; ValueError, saying why, for anything else."""
    cpus: set[int] = set()
    for part in str(text).split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(
                f"--cpus {text!r}: expected CPU numbers and ranges, as taskset -c takes them "
                "(0-3,8)"
            )
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"--cpus {text!r}: the range {part.strip()} runs backwards")
        cpus.update(range(low, high + 1))
    return cpus


def format_cpu_list(cpus: set[int]) -> str:
    """{0, 1, 2, 3, 8} -> `0-3,8` (the inverse of parse_cpu_list)."""
    ranges: list[str] = []
    for cpu in sorted(cpus):
        if ranges and cpu == int(ranges[-1].rpartition("-")[2]) + 1:
            ranges[-1] = f"{ranges[-1].partition('-')[0]}-{cpu}"
        else:
            ranges.append(str(cpu))
    return ",".join(ranges)


def _online() -> str:
    try:
        return Path("/sys/devices/system/cpu/online").read_text().strip()
    except OSError:
        return format_cpu_list(set(range(os.cpu_count() or 1)))


def pin_worker(text: str) -> set[int]:
    """Run this process (and so the threads and children it starts) on the CPUs `text`
    names, which may be wider than the set it inherited (a parent's `taskset`).

    ValueError, saying why, for CPUs the machine lacks or a container's cpuset keeps
    from it: the kernel grants the rest of the set, so what it granted is checked."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus needs CPU affinity (sched_setaffinity), which Linux has")
    cpus = parse_cpu_list(text)
    try:
        os.sched_setaffinity(0, cpus)
        granted = os.sched_getaffinity(0)
    except OSError:  # EINVAL: not one of them is allowed
        granted = set()
    if granted != cpus:
        raise ValueError(
            f"--cpus {text}: CPU {format_cpu_list(cpus - granted)} is not one this worker "
            f"may run on (the machine's CPUs: {_online()}; a container's cpuset may "
            "allow fewer)"
        )
    return cpus


def check_cpus(text: str) -> set[int]:
    """pin_worker's answer for `text`, this process's own set left as it was."""
    if not hasattr(os, "sched_getaffinity"):
        return pin_worker(text)  # raises: no affinity to check
    before = os.sched_getaffinity(0)
    try:
        return pin_worker(text)
    finally:
        os.sched_setaffinity(0, before)


def keep_off(cpus: set[int]) -> set[int]:
    """Move every thread of this process off `cpus` (serve's API, when its workers
    hold them); returns the CPUs it keeps, or nothing when `cpus` are all it has."""
    rest = os.sched_getaffinity(0) - cpus
    if rest:
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(task), rest)
    return rest


def pinned_cpus() -> set[int] | None:
    """This process's CPU set when it is narrower than the machine; None when it is not."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = os.sched_getaffinity(0)
    return cpus if len(cpus) < (os.cpu_count() or len(cpus)) else None
