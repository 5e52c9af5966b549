"""`torchyard train`'s progress bar: a callback of the engine's trainer.

Its own module, imported when `train` runs: the engine's callbacks import torch,
which every other command (submit, status...) would otherwise load at start.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from worker.engine.callbacks import Callback


class ProgressBar(Callback):
    """A rich progress bar fed by the trainer's callback hooks (no device syncs)."""

    name = "progress"

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: Any = None

    def on_fit_start(self, trainer: Any) -> None:
        total = trainer.steps_per_epoch * trainer.spec.training.epochs
        if trainer.spec.training.max_steps:
            total = min(total, trainer.spec.training.max_steps)
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=total, completed=trainer.step, epoch=f"{trainer.epoch}", info=""
        )

    def on_batch_end(self, trainer: Any) -> None:
        self.progress.update(
            self.task,
            completed=trainer.step,
            epoch=f"{trainer.epoch} of {trainer.spec.training.epochs}",
        )

    def on_log(self, trainer: Any, points: list[Any]) -> None:
        loss = next((p.value for p in points if p.name == "loss_step"), None)
        if loss is not None:
            self.progress.update(self.task, info=f"loss {loss:.4f}")

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        shown = {
            k: v for k, v in metrics.items() if k not in ("epoch_time_s", "samples_per_s", "lr")
        }
        text = "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
        self.progress.console.print(f"epoch {epoch}: {text}", highlight=False)

    def on_fit_end(self, trainer: Any) -> None:
        self.progress.stop()
