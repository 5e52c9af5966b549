"""What a dataset field looks like, without its data: the shape contract between data and build."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldInfo:
    """One model input or target as the dataset provides it.

    `shape` is per sample (no batch dimension): an NPZ array of shape (N, 1, 8, 8)
    gives (1, 8, 8); a single CSV column gives (); a list of k columns gives (k,).
    `dtype` is a numpy dtype name ("float32", "int64", "bool", ...).
    `num_classes` is max(label) + 1 for integer fields when known, else None.
    """

    shape: tuple[int, ...]
    dtype: str
    num_classes: int | None = None

    @property
    def is_integer(self) -> bool:
        return self.dtype.startswith(("int", "uint"))

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))
