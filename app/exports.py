"""Checkpoint exports (torch.export `.pt2`, ONNX), made on first request and cached."""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from app.errors import Unprocessable
from app.field_infos import from_json

ExportFormat = Literal["pt2", "onnx"]

# One export per file at a time; a second request waits and then finds the cache.
_locks: defaultdict[Path, threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()


def export_path(weights: Path, fmt: ExportFormat) -> Path:
    return weights.with_suffix(f".{fmt}")


def export_checkpoint(
    spec_doc: dict[str, Any], fields: dict[str, Any], kind: str, weights: Path, fmt: ExportFormat
) -> Path:
    """The export of a weights checkpoint; Unprocessable when it cannot be made faithfully."""
    if kind == "last":
        raise Unprocessable(
            "export takes weights (best or top_k checkpoints), not a training state (last)"
        )
    out = export_path(weights, fmt)
    with _locks_guard:
        lock = _locks[out]
    with lock:
        if out.exists():
            return out
        from worker.engine.errors import SpecError
        from worker.engine.export import ExportError, export_model
        from worker.engine.spec import parse_spec

        try:
            export_model(parse_spec(spec_doc), from_json(fields["inputs"]), weights, out, fmt)
        except (ExportError, SpecError) as exc:
            raise Unprocessable(str(exc).strip().splitlines()[0]) from None
    return out
