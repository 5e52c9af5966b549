"""Callbacks: checkpointing, early stopping, NaN guard, reporting.

Each callback is a small class with no-op hooks and `state_dict()` /
`load_state_dict()`, so a resumed run continues exactly where it stopped. The
decisions themselves are pure functions returning `(decision, reason)`, tested
without a trainer.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from safetensors.torch import save_file
from torch import nn

from worker.engine.files import atomic_path, atomic_write_text
from worker.engine.spec import JobSpec

Mode = Literal["min", "max"]


# ------------------------------------------------------------ pure decisions


def is_improvement(value: float, best: float | None, mode: Mode, min_delta: float = 0.0) -> bool:
    """True when `value` beats `best` by more than `min_delta` (NaN never improves)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@dataclass
class EarlyStopState:
    best: float | None = None
    best_epoch: int | None = None
    wait: int = 0


def early_stopping_decision(
    state: EarlyStopState,
    value: float,
    epoch: int,
    *,
    mode: Mode,
    patience: int,
    min_delta: float = 0.0,
    start_from_epoch: int = 0,
    monitor: str = "metric",
) -> tuple[EarlyStopState, bool, str]:
    """Return (new state, stop?, reason). Epochs before `start_from_epoch` never count."""
    if epoch < start_from_epoch:
        return state, False, f"epoch {epoch} is before start_from_epoch {start_from_epoch}"
    if is_improvement(value, state.best, mode, min_delta):
        return EarlyStopState(best=value, best_epoch=epoch, wait=0), False, f"{monitor} improved"
    wait = state.wait + 1
    new = EarlyStopState(best=state.best, best_epoch=state.best_epoch, wait=wait)
    if wait > patience:
        reason = (
            f"{monitor} did not improve for {wait} epochs "
            f"(best {state.best:.6g} at epoch {state.best_epoch}, patience {patience})"
        )
        return new, True, reason
    return new, False, f"{monitor} did not improve ({wait}/{patience})"


def top_k_decision(
    kept: list[tuple[float, int]], value: float, epoch: int, *, k: int, mode: Mode
) -> tuple[bool, list[tuple[float, int]], list[int]]:
    """Should epoch's weights join the top k? Returns (save?, new kept list, evicted epochs).

    `kept` holds (value, epoch) best first. Ties keep the earlier epoch.
    """
    if k <= 0 or math.isnan(value):
        return False, kept, []
    candidates = [*kept, (value, epoch)]
    sign = 1.0 if mode == "min" else -1.0
    ranked = sorted(candidates, key=lambda item: (sign * item[0], item[1]))
    new_kept = ranked[:k]
    evicted = [e for _, e in ranked[k:] if e != epoch]
    return (value, epoch) in new_kept, new_kept, evicted


def nan_decision(first_bad_step: int, loss_name: str = "loss") -> tuple[bool, str]:
    """first_bad_step < 0 means every loss so far was finite."""
    if first_bad_step < 0:
        return False, "loss is finite"
    return True, f"{loss_name} became NaN or Inf at step {first_bad_step}"


# ------------------------------------------------------------------ reporting


@dataclass(frozen=True)
class MetricPoint:
    name: str
    value: float
    step: int
    epoch: int
    time: float


@dataclass(frozen=True)
class CheckpointInfo:
    kind: Literal["best", "last", "top_k"]
    epoch: int
    step: int
    path: Path
    monitor: str | None = None
    value: float | None = None


class Reporter(Protocol):
    """Where a run's metrics and checkpoints go: files here, the API in the service."""

    def log_metrics(self, points: list[MetricPoint]) -> None: ...
    def log_checkpoint(self, info: CheckpointInfo) -> None: ...
    def log_line(self, text: str) -> None: ...  # to the job's log (the device it trains on)
    def cancel_requested(self) -> bool: ...


class NullReporter:
    def log_metrics(self, points: list[MetricPoint]) -> None:
        pass

    def log_checkpoint(self, info: CheckpointInfo) -> None:
        pass

    def log_line(self, text: str) -> None:
        pass

    def cancel_requested(self) -> bool:
        return False


class FileReporter(NullReporter):
    """Writes `metrics.jsonl` (one point a line) in the run folder.

    On resume, points past the resumed step are dropped first: the resumed run
    reports them again, so every (name, step) appears exactly once.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                point = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if point.get("step", 0) <= step:
                kept.append(json.dumps(point))
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log_metrics(self, points: list[MetricPoint]) -> None:
        with self.path.open("a") as handle:
            for point in points:
                handle.write(json.dumps(asdict(point)) + "\n")


def save_weights(
    module: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Weights as safetensors, written to a temp name then renamed (never a half file)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# ------------------------------------------------------------------ callbacks


class TrainerView(Protocol):
    """What a callback may touch of the trainer (`worker.engine.train.Trainer` has it all).

    A Protocol, not the Trainer class, so this module does not import the loop
    that imports it.
    """

    spec: JobSpec
    model: nn.Module
    reporter: Reporter
    epoch: int  # epochs completed
    step: int  # optimizer steps taken
    steps_per_epoch: int
    stopped_early: bool

    def request_stop(self, reason: str, *, early: bool = False) -> None: ...
    def weights_metadata(self, epoch: int) -> dict[str, str]: ...


class Callback:
    """Hooks the trainer calls; all are no-ops by default.

    Order in `fit()`: `on_fit_start`, then per batch `on_batch_end` (and `on_log`
    every `log_every_n_steps`), per epoch `on_epoch_end`; if the run raises,
    `on_exception(trainer, exc)` before the error goes on; `on_fit_end` always
    comes last, failed or not, so it is where a callback lets go of what it holds
    (a progress bar, a file).
    """

    # The key of this callback's state in last.pt files written before `state_key`
    # (format 1); read only to resume those.
    name = "callback"

    @property
    def state_key(self) -> str:
        """This callback's key in last.pt: unique among a run's callbacks.

        As Lightning's `Callback.state_key`: the class name, plus (for callbacks a
        run may hold more than one of) the config that tells them apart, via
        `_generate_state_key(**config)`.
        """
        return type(self).__qualname__

    def _generate_state_key(self, **config: Any) -> str:
        return f"{type(self).__qualname__}{config!r}"

    def on_fit_start(self, trainer: TrainerView) -> None:
        pass

    def on_batch_end(self, trainer: TrainerView) -> None:
        """Called every batch: must not sync with the device."""

    def on_log(self, trainer: TrainerView, points: list[MetricPoint]) -> None:
        """Called every `log_every_n_steps` with the step metrics just read."""

    def on_epoch_end(self, trainer: TrainerView, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def on_exception(self, trainer: TrainerView, exc: BaseException) -> None:
        """The run raised `exc` (a failed run, or a bug); it propagates after this."""

    def on_fit_end(self, trainer: TrainerView) -> None:
        """Always the last hook, after a normal end or after `on_exception`."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class _CheckpointState:
    best: float | None = None
    best_epoch: int | None = None
    kept: list[tuple[float, int]] = field(default_factory=list)


class ModelCheckpoint(Callback):
    """Keeps the weights of the best epoch by `monitor` as `best.safetensors`.

    The weights saved are exactly those evaluated for that epoch's metrics, so
    evaluating `best.safetensors` on the validation data gives back the best value.
    With save_top_k > 1 the k best epochs are kept as `epoch_<n>.safetensors` too,
    and `best.safetensors` is a byte copy of its epoch's file.
    """

    name = "checkpoint"

    def __init__(
        self,
        run_dir: Path,
        *,
        monitor: str,
        mode: Mode,
        save_top_k: int = 1,
        every_n_epochs: int = 1,
    ):
        self.run_dir = run_dir
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.every_n_epochs = every_n_epochs
        self.state = _CheckpointState()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor, mode=self.mode, every_n_epochs=self.every_n_epochs
        )

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.safetensors"

    def on_epoch_end(self, trainer: TrainerView, epoch: int, metrics: dict[str, float]) -> None:
        if (epoch + 1) % self.every_n_epochs != 0 or self.save_top_k == 0:
            return
        value = metrics[self.monitor]
        save, kept, evicted = top_k_decision(
            self.state.kept, value, epoch, k=self.save_top_k, mode=self.mode
        )
        self.state.kept = kept
        saved: Path | None = None
        if self.save_top_k > 1:
            for old in evicted:
                (self.run_dir / f"epoch_{old}.safetensors").unlink(missing_ok=True)
            if save:
                saved = self.run_dir / f"epoch_{epoch}.safetensors"
                save_weights(trainer.model, saved, trainer.weights_metadata(epoch))
                trainer.reporter.log_checkpoint(
                    CheckpointInfo("top_k", epoch, trainer.step, saved, self.monitor, value)
                )
        if is_improvement(value, self.state.best, self.mode):
            self.state.best, self.state.best_epoch = value, epoch
            if saved is not None:
                # The same weights, byte for byte: safetensors writes its metadata in
                # a random order, and the service stores files of equal sha256 once.
                with atomic_path(self.best_path) as tmp:
                    shutil.copyfile(saved, tmp)
            else:
                save_weights(trainer.model, self.best_path, trainer.weights_metadata(epoch))
            trainer.reporter.log_checkpoint(
                CheckpointInfo("best", epoch, trainer.step, self.best_path, self.monitor, value)
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.state.best,
            "best_epoch": self.state.best_epoch,
            "kept": [[v, e] for v, e in self.state.kept],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = _CheckpointState(
            best=state["best"],
            best_epoch=state["best_epoch"],
            kept=[(float(v), int(e)) for v, e in state["kept"]],
        )


class EarlyStopping(Callback):
    name = "early_stopping"

    def __init__(
        self,
        *,
        monitor: str,
        mode: Mode,
        patience: int,
        min_delta: float = 0.0,
        start_from_epoch: int = 0,
        restore_best_weights: bool = False,
    ):
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.start_from_epoch = start_from_epoch
        self.restore_best_weights = restore_best_weights
        self.state = EarlyStopState()
        self.best_weights: dict[str, torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def on_epoch_end(self, trainer: TrainerView, epoch: int, metrics: dict[str, float]) -> None:
        self.state, stop, reason = early_stopping_decision(
            self.state,
            metrics[self.monitor],
            epoch,
            mode=self.mode,
            patience=self.patience,
            min_delta=self.min_delta,
            start_from_epoch=self.start_from_epoch,
            monitor=self.monitor,
        )
        if self.restore_best_weights and self.state.best_epoch == epoch:
            self.best_weights = {
                k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()
            }
        if stop:
            trainer.request_stop(reason, early=True)

    def on_fit_end(self, trainer: TrainerView) -> None:
        if self.restore_best_weights and self.best_weights is not None and trainer.stopped_early:
            trainer.model.load_state_dict(self.best_weights)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.state.best,
            "best_epoch": self.state.best_epoch,
            "wait": self.state.wait,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = EarlyStopState(state["best"], state["best_epoch"], state["wait"])
        self.best_weights = state.get("best_weights")


class ProgressTimer(Callback):
    """Wall-clock limits (`max_time_s`): checked per batch on the host only, no device sync."""

    name = "timer"

    def __init__(self, max_time_s: float | None):
        self.max_time_s = max_time_s
        self.started = time.monotonic()
        self.elapsed_before = 0.0

    def on_fit_start(self, trainer: TrainerView) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def on_batch_end(self, trainer: TrainerView) -> None:
        if self.max_time_s is not None and self.elapsed() >= self.max_time_s:
            trainer.request_stop(f"max_time_s {self.max_time_s:g} reached")

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.elapsed_before = float(state["elapsed"])
