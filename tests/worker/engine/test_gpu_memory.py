"""A dataset too big for the GPU with `in_memory: "always"`: the error names its size.

No GPU runs here, so the GPU is faked (the only fake this suite allows: what cannot
run here): copying to `cuda` raises torch's out-of-memory error, and the free memory
reads 2 of 80 GiB. bench/gpu_check.py runs the real CUDA paths on a lent GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine.batches import InMemoryBatches
from worker.engine.data import ArrayData
from worker.engine.errors import DataError


@pytest.fixture
def small_gpu(monkeypatch):
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        if isinstance(device, torch.device | str) and torch.device(device).type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))


def test_a_split_that_does_not_fit_names_its_size_and_the_gpus_free_memory(small_gpu):
    rows = 1_000
    data = ArrayData(
        {"x": np.zeros((rows, 768), dtype=np.float32)}, {"y": np.zeros(rows, dtype=np.int64)}
    )
    with pytest.raises(DataError) as caught:
        InMemoryBatches(data, batch_size=32, shuffle=True, drop_last=False, device="cuda:0", seed=0)
    message = str(caught.value)
    assert "in_memory 'always'" in message
    assert f"{data.nbytes / 2**30:.2f} GiB" in message  # the split's size, not the batch's
    assert "2.00 GiB free of 80.00 GiB" in message
    assert "in_memory 'auto' or 'never'" in message  # what to do instead
    assert "batch" not in message.split(";")[0]
