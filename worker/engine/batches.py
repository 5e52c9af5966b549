"""Arrays -> batches on the training device: in memory by index, or streamed.

The data order of an epoch is a pure function of (seed, epoch), so a resumed run
sees the same batches with no saved sampler state. In a data-parallel run every
rank computes the same order and takes its own share of each (global) batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import psutil
import torch
from torch import Tensor

from worker.engine.data import ArrayData
from worker.engine.distributed import Ranks, shard
from worker.engine.errors import DataError
from worker.engine.spec import DataSpec


def epoch_order(num_rows: int, seed: int, epoch: int) -> Tensor:
    """The shuffled row order of one epoch: a pure function of (seed, epoch), on the CPU."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator)


class Batches(Protocol):
    num_samples: int  # rows seen per epoch by all ranks (drop_last leaves some out)

    def __len__(self) -> int: ...  # batches per epoch

    def epoch(
        self, epoch: int, first: int = 0
    ) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]: ...


@dataclass
class _Plan:
    """Which rows each batch of an epoch takes; shared so both kinds batch identically.

    `batch_size` is the global batch; this rank takes its `shard` of each. Training
    (`every_rank`) needs rows on every rank for every batch, as each rank steps the
    optimizer together: a last batch with fewer rows than ranks is left out. Validation
    keeps it, and a rank with no rows of it skips it."""

    num_rows: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    seed: int
    ranks: Ranks = field(default_factory=Ranks)
    every_rank: bool = True
    num_samples: int = field(init=False)

    def __post_init__(self) -> None:
        short = self.num_rows % self.batch_size
        too_short = self.every_rank and short < self.ranks.world_size
        self.num_samples = self.num_rows - (short if self.drop_last or too_short else 0)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def bounds(self, first: int = 0) -> Iterator[tuple[int, int]]:
        """This rank's row ranges of the batches from batch `first` on (a resumed epoch
        skips the rest); empty shares are skipped."""
        rank, world = self.ranks.rank, self.ranks.world_size
        for start in range(first * self.batch_size, self.num_samples, self.batch_size):
            lo, hi = shard(start, min(start + self.batch_size, self.num_samples), rank, world)
            if hi > lo:
                yield lo, hi


class InMemoryBatches:
    """The whole split as tensors on the device; each batch is one index_select (or slice)."""

    def __init__(
        self,
        data: ArrayData,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        device: torch.device,
        seed: int,
        ranks: Ranks | None = None,
        every_rank: bool = True,
    ):
        self.device = torch.device(device)
        self.plan = _Plan(
            len(data), batch_size, shuffle, drop_last, seed, ranks or Ranks(), every_rank
        )
        self.num_samples = self.plan.num_samples
        try:
            self.inputs = {k: torch.from_numpy(v).to(self.device) for k, v in data.inputs.items()}
            self.targets = {k: torch.from_numpy(v).to(self.device) for k, v in data.targets.items()}
        except torch.cuda.OutOfMemoryError:
            # Not the batch size's fault: say what did not fit, and where it would.
            self.inputs = self.targets = {}
            raise DataError(_too_big_for_gpu(data.nbytes, self.device)) from None

    def __len__(self) -> int:
        return len(self.plan)

    def epoch(
        self, epoch: int, first: int = 0
    ) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
        """The batches of `epoch` from batch `first` on."""
        plan = self.plan
        order = None
        if plan.shuffle:
            order = epoch_order(plan.num_rows, plan.seed, epoch).to(self.device, non_blocking=True)
        for start, stop in plan.bounds(first):
            if order is None:
                yield _take_slice(self.inputs, start, stop), _take_slice(self.targets, start, stop)
            else:
                index = order[start:stop]
                yield _take_index(self.inputs, index), _take_index(self.targets, index)


def _too_big_for_gpu(nbytes: int, device: torch.device) -> str:
    free, total = torch.cuda.mem_get_info(device)
    return (
        f"data.in_memory 'always': a split of {nbytes / 2**30:.2f} GiB does not fit in the "
        f"memory of {device} ({free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB); "
        f"use in_memory 'auto' or 'never' to stream batches from host memory"
    )


def _take_slice(tensors: dict[str, Tensor], start: int, stop: int) -> dict[str, Tensor]:
    return {k: t[start:stop] for k, t in tensors.items()}


def _take_index(tensors: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    return {k: t.index_select(0, index) for k, t in tensors.items()}


class _EpochSampler(torch.utils.data.Sampler):
    """Yields one batch's rows at a time; `epoch` is set before each pass over the loader.

    The sampler runs in the main process even with persistent workers, so setting
    the epoch here changes what the workers are asked for.
    """

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.epoch = 0
        self.first = 0  # the batch to start from (a resumed epoch)

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[slice | np.ndarray]:
        plan = self.plan
        order = epoch_order(plan.num_rows, plan.seed, self.epoch).numpy() if plan.shuffle else None
        for start, stop in plan.bounds(self.first):
            yield slice(start, stop) if order is None else order[start:stop]


class _BatchDataset(torch.utils.data.Dataset):
    """Indexed by a whole batch's rows, so there is no per-sample Python and no collate."""

    def __init__(self, data: ArrayData):
        self.num_rows = len(data)
        self.inputs = {k: torch.from_numpy(v) for k, v in data.inputs.items()}
        self.targets = {k: torch.from_numpy(v) for k, v in data.targets.items()}

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, rows: slice | np.ndarray) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if isinstance(rows, slice):
            index = torch.arange(rows.start, rows.stop)
        else:
            index = torch.from_numpy(rows)
        if torch.utils.data.get_worker_info() is None:
            return _take_index(self.inputs, index), _take_index(self.targets, index)
        return _gather_shared(self.inputs, index), _gather_shared(self.targets, index)


def _gather_shared(tensors: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """Gather straight into shared memory, so the batch leaves a worker without another copy.

    default_collate does the same; a plain tensor would be copied into shared memory
    when it is put on the worker's queue.
    """
    out = {}
    for k, t in tensors.items():
        batch = torch.empty((len(index), *t.shape[1:]), dtype=t.dtype).share_memory_()
        out[k] = torch.index_select(t, 0, index, out=batch)
    return out


class StreamingBatches:
    """A DataLoader over the arrays: batches are gathered by workers and copied to the device."""

    def __init__(
        self,
        data: ArrayData,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        device: torch.device,
        seed: int,
        num_workers: int = 0,
        ranks: Ranks | None = None,
        every_rank: bool = True,
    ):
        self.device = torch.device(device)
        self.plan = _Plan(
            len(data), batch_size, shuffle, drop_last, seed, ranks or Ranks(), every_rank
        )
        self.num_samples = self.plan.num_samples
        self.sampler = _EpochSampler(self.plan)
        self.pinned = self.device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            _BatchDataset(data),
            sampler=self.sampler,
            batch_size=None,  # the sampler hands out whole batches
            num_workers=num_workers,
            pin_memory=self.pinned,
            persistent_workers=num_workers > 0,
            # Its own generator: the loader draws a worker seed per pass, which would
            # otherwise advance the global RNG and change dropout versus in-memory batches.
            generator=torch.Generator().manual_seed(seed),
        )

    def __len__(self) -> int:
        return len(self.plan)

    def epoch(
        self, epoch: int, first: int = 0
    ) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
        """The batches of `epoch` from batch `first` on: workers never load the skipped ones."""
        self.sampler.epoch, self.sampler.first = epoch, first
        for inputs, targets in self.loader:
            yield self._to_device(inputs), self._to_device(targets)

    def _to_device(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: t.to(self.device, non_blocking=self.pinned) for k, t in tensors.items()}


def make_batches(
    data: ArrayData,
    spec: DataSpec,
    *,
    device: torch.device,
    seed: int,
    train: bool,
    memory_budget_bytes: int | None = None,
    ranks: Ranks | None = None,
) -> Batches:
    """Batches for one split, this rank's shares of them. Validation (train=False) never
    shuffles and never drops rows."""
    device = torch.device(device)
    options: dict[str, Any] = {
        "batch_size": spec.batch_size,
        "shuffle": train and spec.shuffle,
        "drop_last": train and spec.drop_last,
        "device": device,
        "seed": seed,
        "ranks": ranks,
        "every_rank": train,
    }
    if hold_in_memory(spec.in_memory, data.nbytes, device, memory_budget_bytes):
        return InMemoryBatches(data, **options)
    return StreamingBatches(data, num_workers=spec.num_workers, **options)


def hold_in_memory(
    policy: str, nbytes: int, device: torch.device, budget: int | None = None
) -> bool:
    if policy != "auto":
        return policy == "always"
    return nbytes <= (budget if budget is not None else default_memory_budget(device))


def default_memory_budget(device: torch.device) -> int:
    """A quarter of the free GPU memory (cuda) or of the available RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 4
    # `available` counts reclaimable page cache (Linux's MemAvailable); free pages do not.
    return int(psutil.virtual_memory().available) // 4
