"""Values a GPU kernel would trip over, checked on the host before training starts.

A class label past the output's classes, or an embedding id past its table, is
a "device-side assert triggered" on CUDA at some later step, and the CUDA
context is lost with it. Checked here, each is a one-line `DataError` naming
the dataset, the field and the first bad row.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from worker.engine.build import BuiltModel
from worker.engine.data import ArrayData
from worker.engine.errors import DataError
from worker.engine.losses import BINARY_LOSSES, CLASS_INDEX_LOSSES
from worker.engine.spec import JobSpec

# torch's cross_entropy and nll skip targets equal to their ignore_index, -100 by default.
IGNORE_INDEX = -100


def check_values(spec: JobSpec, built: BuiltModel, where: str, ref: str, data: ArrayData) -> None:
    """Raise DataError on the first out-of-range label, binary target or embedding id.

    `built` is the `BuiltModel` of the spec (output shapes; the module for
    embedding sizes); `where` the spec path of the split ("data.train") and `ref`
    the dataset it names.
    """
    losses = spec.training.losses(spec.output_names)
    fields = spec.data.target_fields()
    for name, values in data.targets.items():
        loss = losses[name]
        field = _field_name(fields[name])
        if loss.type in CLASS_INDEX_LOSSES and values.dtype.kind in "iu":
            classes = built.output_shapes[name][0]
            bad = (values < 0) | (values >= classes)
            bad &= values != IGNORE_INDEX
            _raise_first(
                bad,
                values,
                f"{where} ({ref}): target field {field!r} holds class",
                f"but the output '{name}' has {classes} classes (labels 0..{classes - 1}; "
                f"{IGNORE_INDEX} marks a target the loss ignores)",
            )
        elif loss.type in BINARY_LOSSES:
            bad = ~((values >= 0) & (values <= 1))
            _raise_first(
                bad,
                values,
                f"{where} ({ref}): target field {field!r} holds",
                f"but {loss.type} needs targets in [0, 1]",
            )
    limits = embedding_limits(built)
    inputs = spec.data.input_fields()
    for name, size in limits.items():
        values = data.inputs[name]
        bad = (values < 0) | (values >= size)
        _raise_first(
            bad,
            values,
            f"{where} ({ref}): input field {_field_name(inputs[name])!r} holds token id",
            f"but its embedding has num_embeddings {size} (ids 0..{size - 1})",
        )


def embedding_limits(built: BuiltModel) -> dict[str, int]:
    """Model input name -> the smallest num_embeddings of the embeddings it feeds."""
    if not any(d == torch.long for d in built.input_dtypes.values()):
        return {}  # no token ids: no need to build the module
    module = built.module
    inputs = set(module.input_names)
    limits: dict[str, int] = {}
    # The graph's steps (node, module key, input names): which embedding reads which input.
    for _node, key, sources in module._steps:
        layer = module.layers[key]
        if isinstance(layer, nn.Embedding):
            for source in sources:
                if source in inputs:
                    limits[source] = min(
                        limits.get(source, layer.num_embeddings), layer.num_embeddings
                    )
    return limits


def _field_name(ref: str | list[str]) -> str:
    return ref if isinstance(ref, str) else ",".join(ref)


def _raise_first(bad: np.ndarray, values: np.ndarray, before: str, after: str) -> None:
    if not bad.any():
        return
    flat = bad.reshape(len(bad), -1)
    row = int(np.argmax(flat.any(axis=1)))
    value = values.reshape(len(values), -1)[row][flat[row]][0]
    shown = value.item() if hasattr(value, "item") else value
    raise DataError(f"{before} {shown} at row {row}, {after}")
