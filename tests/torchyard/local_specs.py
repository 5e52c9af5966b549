"""A spec whose datasets are files beside it, as `torchyard train` takes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.app.conftest import job_spec, npz_bytes


def write_local_spec(folder: Path, *, seed: int = 0, **changes: Any) -> Path:
    """folder/spec.json naming data/train.npz and data/val.npz (relative, as users write them)."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "train.npz").write_bytes(npz_bytes(rows=64, seed=seed))
    (folder / "data" / "val.npz").write_bytes(npz_bytes(rows=32, seed=seed + 1))
    spec = job_spec("data/train.npz", data__validation="data/val.npz", **changes)
    path = folder / "spec.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def sources_of(folder: Path) -> dict[str, str]:
    """The dataset sources a job submitted from `write_local_spec(folder)` records."""
    data = folder.resolve() / "data"
    return {
        "data.train": (data / "train.npz").as_posix(),
        "data.validation": (data / "val.npz").as_posix(),
    }
