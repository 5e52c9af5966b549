"""Is CUDA usable here, and if not, why; which GPUs worker i gets.

A `--gpu N` (or `--gpu 0,1`) worker refuses to start unless `cuda_problem()` is None, so a
mis-built image or an old driver fails at start with a reason, not as a job
that fails (or runs on the CPU) later.

The driver is asked directly through libcuda/libnvidia-ml (ctypes): that says
"no driver" and "driver too old for this wheel" apart, where torch only says
CUDA is not available, and it opens no CUDA context in the asking process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass

from worker.engine.spec import CUBLAS_WORKSPACE

# Which wheel to build for an older driver or GPU (docs: README, Deployment).
OLDER_WHEEL_HINT = (
    "build the image with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 "
    "(CUDA 12.6, PyTorch's legacy line: drivers 525 to 579, Maxwell, Pascal and Volta GPUs)"
)


@dataclass(frozen=True)
class DriverInfo:
    """What the NVIDIA driver says, without starting CUDA; None fields: not known."""

    loaded: bool  # libcuda.so.1 could be opened
    cuda_version: tuple[int, int] | None  # the newest CUDA the driver supports
    physical_gpus: int | None  # every GPU on the machine (NVML ignores CUDA_VISIBLE_DEVICES)


def _version(packed: int) -> tuple[int, int]:
    return packed // 1000, (packed % 1000) // 10


def driver_info() -> DriverInfo:
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return DriverInfo(False, None, _nvml_count())
    version = ctypes.c_int(0)
    cuda = None
    with contextlib.suppress(AttributeError):
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value:
            cuda = _version(version.value)
    return DriverInfo(True, cuda, _nvml_count())


def _nvml_count() -> int | None:
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        count = ctypes.c_uint(0)
        ok = nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0
        nvml.nvmlShutdown()
        return count.value if ok else None
    except (OSError, AttributeError):
        return None


def wheel_cuda() -> tuple[int, int] | None:
    """The CUDA version torch was built for; None for a CPU-only build."""
    import torch

    if not torch.version.cuda:
        return None
    major, minor, *_ = (int(p) for p in torch.version.cuda.split("."))
    return major, minor


def driver_problem() -> str | None:
    """Why CUDA cannot work here, judged without starting it; None when it may."""
    import torch

    wheel = wheel_cuda()
    if wheel is None:
        return (
            f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build "
            f"(the image's default TORCH_INDEX)"
        )
    driver = driver_info()
    if not driver.loaded:
        return (
            "no NVIDIA driver found (libcuda.so.1 is missing): install the driver on the host, "
            "and in docker give the container GPUs (the NVIDIA container toolkit, "
            "`gpus:`/`devices:` in compose)"
        )
    # CUDA's minor-version compatibility: any driver of the same major version runs the wheel.
    if driver.cuda_version is not None and driver.cuda_version[0] < wheel[0]:
        return (
            f"the NVIDIA driver is too old for this torch: it supports CUDA "
            f"{driver.cuda_version[0]}.{driver.cuda_version[1]}, torch {torch.__version__} "
            f"needs CUDA {wheel[0]}.x; upgrade the driver (CUDA 13 needs >= 580) or "
            f"{OLDER_WHEEL_HINT}"
        )
    return None


def cuda_problem(index: int = 0) -> str | None:
    """None when CUDA device `index` (as this process sees it) really runs a kernel; else why not.

    Starts CUDA in this process: call it where the process will use the GPU anyway.
    """
    problem = driver_problem()
    if problem is not None:
        return problem
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        count = torch.cuda.device_count()
    except RuntimeError as exc:  # torch says why: the driver refused
        return f"CUDA cannot start: {str(exc).strip().splitlines()[0]}"
    if count <= index:
        physical = driver_info().physical_gpus
        seen = f"{count} GPU(s) visible" + (
            f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        )
        return f"no CUDA device {index}: {seen}" + (
            f", {physical} on this machine" if physical is not None else ""
        )
    major, minor = torch.cuda.get_device_capability(index)
    arch = f"sm_{major}{minor}"
    built = torch.cuda.get_arch_list()
    runs = _runs_on(built, major, minor)
    name = torch.cuda.get_device_name(index)
    if not runs:
        return (
            f"{name} ({arch}) is not supported by this torch build (built for "
            f"{', '.join(built)}); {OLDER_WHEEL_HINT}"
        )
    try:
        torch.ones(1, device=f"cuda:{index}").add_(1).item()
    except RuntimeError as exc:
        return f"CUDA device {index} ({name}) failed a test kernel: {str(exc).splitlines()[0]}"
    return None


def _runs_on(built: list[str], major: int, minor: int) -> bool:
    """sm_XY code runs on GPUs of major X and minor >= Y; compute_XY (PTX) on any newer GPU."""
    for name in built:
        kind, _, digits = name.partition("_")
        digits = digits.rstrip("af")  # sm_90a, sm_100f: family-specific builds
        if not digits.isdigit() or len(digits) < 2:
            continue
        arch_major, arch_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def parse_gpu_set(text: str) -> list[int]:
    """`--gpu 0` or `--gpu 0,1`: the GPUs (as this process sees them) a worker trains on.

    ValueError, saying why, for anything but distinct non-negative indices."""
    parts = [part.strip() for part in str(text).split(",")]
    if not all(part.isdigit() for part in parts):  # '' too: split gives ['']
        raise ValueError(f"--gpu {text!r}: expected a GPU index or a comma list of them (0,1)")
    gpus = [int(part) for part in parts]
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpu {text!r}: a GPU is named twice")
    return gpus


def gpus_for_workers(workers: int, gpus: int, per_worker: int = 1) -> list[list[int]]:
    """The GPU set of each of `serve --workers N`'s workers: worker i takes GPUs
    i*K .. i*K+K-1 (K per worker); workers past the last whole set use the CPU ([])."""
    return [
        list(range(i * per_worker, (i + 1) * per_worker)) if (i + 1) * per_worker <= gpus else []
        for i in range(workers)
    ]


def visible_gpu_count() -> int:
    """GPUs a `serve` can hand to its workers, without opening a CUDA context here."""
    if driver_problem() is not None:
        return 0
    import torch

    try:
        return torch.cuda.device_count()
    except RuntimeError:
        return 0


def worker_environment(gpus: list[int]) -> dict[str, str]:
    """Environment a worker sets before torch starts CUDA; its training children inherit it.

    `gpus` counts the GPUs this process sees: under CUDA_VISIBLE_DEVICES=2,3, GPU 1 is 3.
    The worker and its children see only its set, as cuda:0, cuda:1, ..."""
    env = {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)}
    if gpus:
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
        visible = [d for d in visible if d]
        if not visible:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in gpus)
        else:  # -1: none, so the start check says which GPU is not there
            mapped = [visible[gpu] if gpu < len(visible) else "-1" for gpu in gpus]
            env["CUDA_VISIBLE_DEVICES"] = "-1" if "-1" in mapped else ",".join(mapped)
        env["TORCHYARD_GPU"] = ",".join(str(gpu) for gpu in gpus)
    return env


def worker_gpu_problem(count: int = 1) -> str | None:
    """Why a `--gpu` worker (its environment set by `worker_environment`) cannot train on
    each of its `count` GPUs; None when it can.

    Checked in a throwaway process: a CUDA context opened here would hold GPU memory
    for the worker's whole life, and the worker's children open their own.
    """
    check = (
        "from worker.gpus import cuda_problem\n"
        f"print(next(filter(None, map(cuda_problem, range({int(count)}))), ''))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", check], capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return "the CUDA check did not finish within 5 minutes (a hung driver?)"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the CUDA check crashed (exit code {done.returncode}): {tail}"
    return lines[-1] if lines and lines[-1] else None


def serve_gpus(workers: int, per_worker: int = 1) -> list[list[int]]:
    """The GPU set of each of `serve --workers N`'s workers ([]: a CPU worker)."""
    return gpus_for_workers(workers, visible_gpu_count(), per_worker)
