"""The training child's side of its reports: they go on a queue to the worker parent.

The child never talks HTTP: its `QueueReporter` puts reports on a queue and
snapshots checkpoint files; `worker/uploader.py`, in the parent, sends them.
"""

from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from worker.engine.callbacks import Callback, CheckpointInfo, MetricPoint, TrainerView


class QueueReporter:
    """The child's side: a Reporter that only enqueues (never blocks on the network)."""

    def __init__(self, outbox: Any, cancel: Any, run_dir: Path):
        self.outbox = outbox
        self.cancel = cancel
        self.snapshots = run_dir / "outbox"
        self.snapshots.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count()

    def log_metrics(self, points: list[MetricPoint]) -> None:
        self.outbox.put(("metrics", [asdict(p) for p in points]))

    def log_checkpoint(self, info: CheckpointInfo) -> None:
        # best.safetensors is replaced by the next best before the parent may have
        # sent it: snapshot this version (a hard link survives os.replace).
        snapshot = (
            self.snapshots / f"{next(self._counter):06d}-{info.kind}-{info.epoch}{info.path.suffix}"
        )
        try:
            os.link(info.path, snapshot)
        except OSError:
            shutil.copyfile(info.path, snapshot)
        meta = {
            "kind": info.kind,
            "epoch": info.epoch,
            "step": info.step,
            "monitor": info.monitor,
            "value": info.value,
        }
        self.outbox.put(("checkpoint", {**meta, "path": str(snapshot)}))

    def log_line(self, text: str) -> None:
        self.outbox.put(("log", [text]))

    def cancel_requested(self) -> bool:
        return self.cancel.is_set()


class ProgressToQueue(Callback):
    """Sends progress (for heartbeats and ETA) and a log line per epoch."""

    name = "progress_to_queue"

    def __init__(self, outbox: Any):
        self.outbox = outbox

    def _progress(self, trainer: TrainerView) -> None:
        self.outbox.put(
            (
                "progress",
                {
                    "epoch": trainer.epoch,
                    "epochs": trainer.spec.training.epochs,
                    "step": trainer.step,
                    "steps_per_epoch": trainer.steps_per_epoch,
                },
            )
        )

    def on_fit_start(self, trainer: TrainerView) -> None:
        self._progress(trainer)

    def on_log(self, trainer: TrainerView, points: list[MetricPoint]) -> None:
        self._progress(trainer)

    def on_epoch_end(self, trainer: TrainerView, epoch: int, metrics: dict[str, float]) -> None:
        self._progress(trainer)
        shown = "  ".join(f"{k} {v:.5g}" for k, v in metrics.items())
        # Epochs count from 0 everywhere (metrics, checkpoints, best epoch), as in Lightning.
        self.outbox.put(("log", [f"epoch {epoch} of {trainer.spec.training.epochs}: {shown}"]))
