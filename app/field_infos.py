"""FieldInfo <-> JSON: how dataset fields are kept in the database between upload and export."""

from __future__ import annotations

from typing import Any


def to_json(fields: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: {"dtype": info.dtype, "shape": list(info.shape), "num_classes": info.num_classes}
        for name, info in fields.items()
    }


def from_json(data: dict[str, Any]) -> dict[str, Any]:
    from worker.engine.fields import FieldInfo

    return {
        name: FieldInfo(
            shape=tuple(int(d) for d in item["shape"]),
            dtype=str(item["dtype"]),
            num_classes=item.get("num_classes"),
        )
        for name, item in data.items()
    }
