"""Data-parallel training on torch.distributed: the ranks, the process group, the shards.

A rank learns who it is from the environment torch's launchers set (`RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`/`MASTER_PORT`, or the elastic agent's
store): `torchyard train` starts ranks with `worker.engine.launch`, and any
`torchrun` (one node or several) works the same way. Gradients are averaged by
DistributedDataParallel; the few other collectives a run needs are here, and
with one rank each is the identity, with no process group at all.

Semantics (README, "Data-parallel training"): `data.batch_size` is the global
batch; rank r takes its r-th share of each batch of the engine's epoch order;
metric sums and the step losses are summed across ranks before they are read;
rank 0 alone reports and writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from worker.engine.spec import JobSpec

# How long a collective waits for the other ranks. A rank that dies is noticed
# by the launcher's agent within its monitor interval, and it ends the rest;
# this bounds the other case, a rank alive but stuck (or a node cut off).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("TORCHYARD_COLLECTIVE_TIMEOUT_S", "300"))


# What torch.distributed raises when a peer is gone: NCCL, the store and the
# launcher raise `DistError`s; gloo's TCP transport a plain RuntimeError naming itself.
_GLOO_TRANSPORT = ("gloo/transport/", "Connection closed by peer", "Connection reset by peer")


def is_peer_lost(exc: BaseException) -> bool:
    """Whether a collective failed because another rank or node of the run is gone
    (killed, its machine lost, its connection dropped): not the job's fault, so the
    service restarts the job from its last checkpoint, as for a lost worker."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _GLOO_TRANSPORT)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank 0 of 1 when no launcher started it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_zero(self) -> bool:
        """The rank that reports and writes files."""
        return self.rank == 0


def check_world(spec: JobSpec, ranks: Ranks) -> str | None:
    """Why this process cannot be a rank of this spec's run; None when it can."""
    want = spec.resources.world_size
    if ranks.world_size == want:
        return None
    if ranks.world_size == 1:
        return (
            f"resources ask for {want} ranks, but this process was started alone: "
            f"train it with `torchyard train` or under torchrun"
        )
    return (
        f"resources ask for {want} ranks, but the launcher started {ranks.world_size} (WORLD_SIZE)"
    )


def rank_device(spec: JobSpec, ranks: Ranks) -> str | None:
    """The device of a data-parallel rank (None: a one-rank run, training.device decides)."""
    if not ranks.distributed:
        return None
    # LOCAL_RANK indexes the GPUs this node's launcher was given (CUDA_VISIBLE_DEVICES).
    return f"cuda:{ranks.local_rank}" if spec.resources.gpu_ranks else "cpu"


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """The default process group for the length of a run (none with one rank)."""
    if not ranks.distributed:
        yield
        return
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if device.type == "cuda":
        # device_id binds the communicator to this rank's GPU at once (eager init).
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def share_cpu_threads() -> None:
    """CPU ranks on one machine split its cores, as torchrun's OMP_NUM_THREADS=1 does
    (unless OMP_NUM_THREADS is set): otherwise each rank's intra-op pool takes every
    core and they fight over them."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // local))


def shard(start: int, stop: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s rows of the global batch `[start, stop)`: contiguous, sizes differing by
    at most one (only a last, short batch is not split evenly)."""
    rows = stop - start
    base, extra = divmod(rows, world_size)
    lo = start + rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class Collectives:
    """The collectives of a run besides DDP's gradient averaging.

    With one rank each is the identity, so the loop has one path for both."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over the ranks, in place (its device's backend: gloo or NCCL)."""
        if self.ranks.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` on rank 0, by rank (None on the other ranks).

        With one rank, [value]. Values are pickled between our own processes only."""
        if not self.ranks.distributed:
            return [value]
        out: list[Any] | None = [None] * self.ranks.world_size if self.ranks.is_zero else None
        dist.gather_object(value, out, dst=0)
        return out

    def first(self, value: Any) -> Any:
        """The first value that is not None, by rank order; the same on every rank."""
        if not self.ranks.distributed:
            return value
        values: list[Any] = [None] * self.ranks.world_size
        dist.all_gather_object(values, value)
        return next((v for v in values if v is not None), None)

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank: the model rank 0
        saves is the one every rank validates."""
        if not self.ranks.distributed:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def data_parallel(module: nn.Module, device: torch.device, *, sync_batchnorm: bool) -> nn.Module:
    """`module` wrapped in DistributedDataParallel (rank 0's weights broadcast to all).

    The module itself stays the one the trainer saves and validates: DDP shares its
    parameters, and its state_dict keys have no `module.` prefix."""
    if sync_batchnorm:
        # Replaces the BatchNorm layers in place; their parameters and buffers keep their names.
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        # Gradients of a bucket are views into it: no copy in and out per step.
        gradient_as_bucket_view=True,
    )
