"""How a run sets up its device: determinism, cuDNN and TF32 flags, the job's GPU, the log line.

These are process-wide torch settings; a training process runs one job, and each
run sets every flag (a later run in the same process never inherits one).
"""

from __future__ import annotations

import os

import torch

from worker.cpus import format_cpu_list, pinned_cpus
from worker.engine.spec import CUBLAS_WORKSPACE, TrainingSpec

# Layers and losses of the allowlist with no deterministic CUDA kernel: under
# `deterministic: true` torch warns and runs them anyway (README, "Reproducibility").
NONDETERMINISTIC_ON_CUDA = (
    "adaptiveavgpool2d/3d and adaptivemaxpool2d backward",
    "maxpool3d and avgpool3d backward",
    "conv with padding_mode reflect or replicate (backward)",
    "nll / cross_entropy on outputs with extra dims (per-pixel labels)",
)


def set_determinism(deterministic: bool) -> None:
    """Before CUDA starts: deterministic kernels and cuBLAS workspace, or cuDNN's autotuner."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    # warn_only: a layer without a deterministic kernel warns instead of failing the job.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    # The autotuner times algorithms per input shape and may pick another one next run.
    torch.backends.cudnn.benchmark = not deterministic


def use_device(device: torch.device, training: TrainingSpec) -> list[str]:
    """Make `device` the current one and set its flags; returns the lines to log at start."""
    if device.type != "cuda":
        threads = torch.get_num_threads()
        pinned = pinned_cpus()  # `worker --cpus`, taskset or a container's cpuset
        on = f" on CPUs {format_cpu_list(pinned)}" if pinned else ""
        return [f"device: {device}, torch {torch.__version__} ({threads} threads{on})"]
    # Without this, pinned-memory threads and autocast checks open a context on GPU 0.
    torch.cuda.set_device(device)
    # PyTorch's default is off for matmuls (cuDNN convolutions use TF32 regardless).
    torch.backends.cuda.matmul.allow_tf32 = training.tf32
    props = torch.cuda.get_device_properties(device)
    # The PCI address tells which physical GPU this is, whatever CUDA_VISIBLE_DEVICES says.
    bus = getattr(props, "pci_bus_id", None)
    where = (
        f", pci {getattr(props, 'pci_domain_id', 0):04x}:{bus:02x}"
        f":{getattr(props, 'pci_device_id', 0):02x}"
        if bus is not None
        else ""
    )
    lines = [
        f"device: {device} ({props.name}, sm_{props.major}{props.minor}, "
        f"{props.total_memory / 2**30:.0f} GiB{where}), torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}"
    ]
    if training.precision == "bf16-mixed" and not torch.cuda.is_bf16_supported(
        including_emulation=False
    ):
        lines.append(
            f"warning: {props.name} has no bfloat16 units (before Ampere): bf16-mixed runs "
            f"emulated and slower than 32; use 16-mixed"
        )
    if training.deterministic and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (
        ":4096:8",
        ":16:8",
    ):
        lines.append(
            "warning: CUBLAS_WORKSPACE_CONFIG was not set before CUDA started: "
            "matmuls may not be deterministic"
        )
    return lines
