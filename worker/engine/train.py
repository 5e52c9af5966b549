"""The training loop, its resumable state, and the run result.

`run_job()` is what both `torchyard train` and the Celery worker call: spec and
files in, a `RunResult` out, metrics and checkpoints through a `Reporter`. It
never raises for a bad spec, bad data, a model that fails on that data, NaN or
out of memory: those end the run `failed` with a one-line reason. Anything else
is a bug of ours and raises, traceback and all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import torch
from torch import nn

from worker.engine.batches import Batches, make_batches
from worker.engine.build import build_model
from worker.engine.callbacks import (
    Callback,
    CheckpointInfo,
    EarlyStopping,
    FileReporter,
    MetricPoint,
    ModelCheckpoint,
    NullReporter,
    ProgressTimer,
    Reporter,
    nan_decision,
)
from worker.engine.data import ArrayData, describe, load_arrays, resolve_fields, split_validation
from worker.engine.devices import set_determinism, use_device
from worker.engine.distributed import (
    Collectives,
    Ranks,
    check_world,
    data_parallel,
    is_peer_lost,
    process_group,
    rank_device,
    share_cpu_threads,
)
from worker.engine.errors import DataError, SpecError
from worker.engine.files import atomic_path, atomic_write_text
from worker.engine.losses import CombinedLoss, target_dtype, target_shape
from worker.engine.metrics import MetricAccumulator
from worker.engine.optim import load_optimizer_state, make_optimizer, make_scheduler
from worker.engine.spec import JobSpec, SplitSpec, default_mode, default_monitor
from worker.engine.value_checks import check_values

# "preempted": stopped on request mid-run (a worker shutting down) after saving a
# last.pt to resume from; the job is not over.
Status = Literal["succeeded", "failed", "cancelled", "preempted"]
PREEMPTED: Final = "preempted"

# What torch raises when a model does not fit the data it is run on (shapes,
# dtypes, index ranges, class ids past the output's classes): the user's to fix.
MODEL_ERRORS = (RuntimeError, ValueError, IndexError)


@dataclass
class RunResult:
    status: Status
    epochs_run: int = 0
    steps: int = 0
    best_epoch: int | None = None
    monitor: str | None = None
    best_value: float | None = None
    stopped_early: bool = False
    stop_reason: str | None = None
    error: str | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    # failed because a rank or node of a data-parallel run was lost, not by the job's
    # fault: the service restarts it from its last checkpoint (locally: `--resume`)
    lost: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunFailed(Exception):
    """Ends a run as failed; the message is the one-line reason users see."""


# ------------------------------------------------------------------ devices


def resolve_device(name: str) -> torch.device:
    """The training device, with its index for CUDA (`cuda` and `auto` mean the current GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunFailed(f"training.device is {name!r} but no CUDA device is available")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RunFailed(
                f"training.device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return device if device.index is not None else torch.device("cuda", 0)
    return torch.device(name)


def autocast_for(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    if precision == "32":
        return contextlib.nullcontext
    if precision == "16-mixed" and device.type != "cuda":
        raise RunFailed(
            "training.precision '16-mixed' needs a CUDA device; use 'bf16-mixed' on CPU"
        )
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------- data


@dataclass
class PreparedData:
    train: ArrayData
    val: ArrayData | None
    inputs: dict[str, Any]
    targets: dict[str, Any]


def prepare(
    spec: JobSpec, resolve: Callable[[str], Path], max_params: int | None = None
) -> PreparedData:
    """Read the dataset files, build the model on the meta device, load arrays to fit it."""
    train_path = resolve(spec.data.train)
    info = describe(train_path)
    inputs, targets = resolve_fields(spec.data, info.fields)
    built = build_model(spec, inputs, targets, device="meta", max_params=max_params)
    losses = spec.training.losses(spec.output_names)
    dtypes: dict[str, Any] = {
        "input_dtypes": {n: str(d).removeprefix("torch.") for n, d in built.input_dtypes.items()},
        "target_dtypes": {
            n: str(target_dtype(losses[n], targets[n])).removeprefix("torch.") for n in targets
        },
        "target_shapes": {
            n: target_shape(losses[n], built.output_shapes[n], targets[n]) for n in targets
        },
    }
    train = load_arrays(train_path, spec.data, **dtypes)
    check_values(spec, built, "data.train", spec.data.train, train)
    val: ArrayData | None = None
    if isinstance(spec.data.validation, SplitSpec):
        train, val = split_validation(train, spec.data.validation.split, spec.seed)
    elif isinstance(spec.data.validation, str):
        val_path = resolve(spec.data.validation)
        val_inputs, val_targets = resolve_fields(spec.data, describe(val_path).fields)
        for kind, ours, theirs in (("input", inputs, val_inputs), ("target", targets, val_targets)):
            for name, fi in ours.items():
                if theirs[name].shape != fi.shape:
                    raise DataError(
                        f"validation {kind} '{name}' has shape {theirs[name].shape} per row; "
                        f"training data has {fi.shape}"
                    )
        val = load_arrays(val_path, spec.data, **dtypes)
        check_values(spec, built, "data.validation", spec.data.validation, val)
    return PreparedData(train, val, inputs, targets)


# ------------------------------------------------------------------ trainer


class Trainer:
    """Runs one job (or one rank of a data-parallel job): the loop in `_train_epoch`,
    validation, checkpoints, resume."""

    def __init__(
        self,
        spec: JobSpec,
        data: PreparedData,
        run_dir: Path,
        *,
        reporter: Reporter | None = None,
        callbacks: list[Callback] | None = None,
        preempt: Callable[[], bool] | None = None,
        ranks: Ranks | None = None,
    ):
        self.spec = spec
        # Asked after every optimizer step (a plain call, no device sync): True saves a
        # last.pt at that point, mid-epoch, and ends the run `preempted`.
        self.preempt = preempt
        self.run_dir = run_dir
        self.reporter: Reporter = reporter or NullReporter()
        self.ranks = ranks or Ranks()
        self.collectives = Collectives(self.ranks)
        # Sums epoch metrics over the ranks (None: one rank, nothing to sum).
        self._reduce = self.collectives.sum_ if self.ranks.distributed else None
        training = spec.training
        set_determinism(training.deterministic)  # before CUDA starts: cuBLAS reads it once
        self.device = resolve_device(rank_device(spec, self.ranks) or training.device)
        for line in use_device(self.device, training):
            self.reporter.log_line(line)
        self.autocast = autocast_for(training.precision, self.device)

        # `model` is what is saved, loaded and validated; a data-parallel run trains it
        # through DDP, which shares its parameters and averages their gradients.
        self.model: nn.Module = build_model(
            spec, data.inputs, data.targets, device=self.device, max_params=None
        ).module
        self.ddp: nn.Module | None = None
        if self.ranks.distributed:
            self.ddp = data_parallel(
                self.model, self.device, sync_batchnorm=training.sync_batchnorm
            )
        trained = self.ddp or self.model
        self.forward_model: Callable[..., Any] = (
            torch.compile(trained) if training.compile else trained
        )
        self.eval_model: Callable[..., Any] = self.forward_model
        if self.ddp is not None:
            # Validation runs each rank's share alone: no collective per batch.
            self.eval_model = torch.compile(self.model) if training.compile else self.model
        self.input_names: list[str] = list(self.model.input_names)
        self.output_names: list[str] = list(self.model.output_names)
        self.single_output = len(self.output_names) == 1

        batches: dict[str, Any] = {"device": self.device, "seed": spec.seed, "ranks": self.ranks}
        self.train_batches: Batches = make_batches(data.train, spec.data, train=True, **batches)
        self.val_batches: Batches | None = (
            make_batches(data.val, spec.data, train=False, **batches)
            if data.val is not None
            else None
        )
        self.accumulate = training.accumulate_grad_batches
        self.steps_per_epoch = math.ceil(len(self.train_batches) / self.accumulate)
        if self.steps_per_epoch == 0:
            raise RunFailed(
                f"data.batch_size {spec.data.batch_size} with drop_last leaves no batch "
                f"from {data.train.__len__()} training rows"
            )

        self.loss_fn = CombinedLoss(training.losses(self.output_names)).to(self.device)
        self.optimizer = make_optimizer(training.optimizer, self.model.parameters())
        self.scheduler = make_scheduler(
            training.scheduler,
            self.optimizer,
            steps_per_epoch=self.steps_per_epoch,
            epochs=training.epochs,
            max_steps=training.max_steps,
        )
        # Disabled, the scaler passes the loss and the step through unchanged, so
        # the loop has one path for every precision.
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=training.precision == "16-mixed"
        )
        self.train_metrics = MetricAccumulator(spec, prefix="", device=self.device)
        self.val_metrics = MetricAccumulator(spec, prefix="val_", device=self.device)

        # Per-step losses of the current logging window, kept on the device and
        # read once per window: no host sync per step, and the NaN guard can
        # still name the exact step.
        self._window = torch.zeros(training.log_every_n_steps * self.accumulate, device=self.device)
        self._window_len = 0
        self._window_first_step = 0
        self._lr_logged_at = -1

        self.callbacks = self._make_callbacks() + list(callbacks or [])
        keys = [cb.state_key for cb in self.callbacks]
        if len(set(keys)) != len(keys):
            twice = sorted({key for key in keys if keys.count(key) > 1})
            raise ValueError(
                f"callbacks share a state_key {twice}: give each a state_key of its own"
            )
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.batch_in_epoch = 0
        self._resume_batch = 0  # batches of the current epoch a mid-epoch last.pt had done
        self.stop_reason: str | None = None
        self.stopped_early = False
        self._stop = False
        # A stop one rank decided alone, until the ranks agree on it (`_agree_on_stop`).
        self._stop_pending: tuple[str, bool] | None = None
        self.last_metrics: dict[str, float] = {}

    # ---------------------------------------------------------- callbacks

    def _make_callbacks(self) -> list[Callback]:
        spec, cbs = self.spec, self.spec.callbacks
        out: list[Callback] = [ProgressTimer(spec.training.max_time_s)]
        self.checkpoint: ModelCheckpoint | None = None
        if cbs.checkpoint is not None and self.ranks.is_zero:  # rank 0 alone writes weights
            monitor = cbs.checkpoint.monitor or default_monitor(spec)
            self.checkpoint = ModelCheckpoint(
                self.run_dir,
                monitor=monitor,
                mode=cbs.checkpoint.mode or default_mode(monitor),
                save_top_k=cbs.checkpoint.save_top_k,
                every_n_epochs=cbs.checkpoint.every_n_epochs,
            )
            out.append(self.checkpoint)
        if cbs.early_stopping is not None:
            es = cbs.early_stopping
            monitor = es.monitor or default_monitor(spec)
            out.append(
                EarlyStopping(
                    monitor=monitor,
                    mode=es.mode or default_mode(monitor),
                    patience=es.patience,
                    min_delta=es.min_delta,
                    start_from_epoch=es.start_from_epoch,
                    restore_best_weights=es.restore_best_weights,
                )
            )
        return out

    def request_stop(self, reason: str, *, early: bool = False) -> None:
        if self.ranks.distributed:
            # Every rank must leave the loop at the same step, or the others wait in a
            # collective for it: a stop one rank decides (a time limit, a cancel, a
            # preemption) waits for the next log window or epoch end, where all agree.
            self._stop_pending = self._stop_pending or (reason, early)
            return
        self._stop_now(reason, early)

    def _stop_now(self, reason: str, early: bool = False) -> None:
        if not self._stop:
            self._stop, self.stop_reason, self.stopped_early = True, reason, early

    def _agree_on_stop(self) -> None:
        """Ranks stop together, for the first reason by rank order (one small collective)."""
        if not self.ranks.distributed:
            return
        agreed = self.collectives.first(self._stop_pending)
        self._stop_pending = None
        if agreed is not None:
            self._stop_now(*agreed)

    def weights_metadata(self, epoch: int) -> dict[str, str]:
        return {
            "epoch": str(epoch),
            "step": str(self.step),
            "inputs": ",".join(self.input_names),
            "outputs": ",".join(self.output_names),
            "spec_sha256": spec_digest(self.spec),
        }

    # --------------------------------------------------------------- loop

    @contextlib.contextmanager
    def _model_errors(self, phase: str) -> Iterator[None]:
        """The user's model failing on the user's data ends the run with one line.

        Only around the model's forward, loss and backward: an error anywhere
        else in the loop is ours, and keeps its traceback."""
        try:
            yield
        except MODEL_ERRORS as exc:
            if is_out_of_memory(exc) or (self.ranks.distributed and is_peer_lost(exc)):
                raise
            raise RunFailed(
                f"{phase} failed at epoch {self.epoch}, step {self.step}: {one_line(exc)}"
            ) from exc

    def _forward(
        self, inputs: dict[str, torch.Tensor], model: Callable[..., Any] | None = None
    ) -> dict[str, torch.Tensor]:
        model = self.forward_model if model is None else model  # (a compiled one has no bool)
        out = model(*[inputs[name] for name in self.input_names])
        return {self.output_names[0]: out} if self.single_output else out

    def _share_weight(self, i: int, rows: int) -> float:
        """What this rank's mean loss on batch `i` is multiplied by so that DDP's average
        over ranks is the mean over the global batch: 1, unless the batch (the last, short
        one) does not split evenly."""
        if not self.ranks.distributed:
            return 1.0
        batch_size = self.spec.data.batch_size
        global_rows = min(batch_size, self.train_batches.num_samples - i * batch_size)
        return rows * self.ranks.world_size / global_rows

    def _train_epoch(self, epoch: int) -> None:
        self.model.train()
        first, self._resume_batch = self._resume_batch, 0
        if first == 0:
            self.train_metrics.reset()  # a resumed epoch goes on with its loaded sums
        n_batches = len(self.train_batches)
        batches = self.train_batches.epoch(epoch, first)
        for i, (inputs, targets) in enumerate(batches, start=first):
            end_of_window = (i + 1) % self.accumulate == 0 or i + 1 == n_batches
            batch_size = next(iter(targets.values())).shape[0]
            weight = self._share_weight(i, batch_size)
            with self._model_errors("training"), self._sync_gradients(end_of_window):
                with self.autocast():
                    outputs = self._forward(inputs)
                    loss, per_output = self.loss_fn(outputs, targets)
                if weight != 1.0:
                    loss = loss * weight
                # Dividing by the window size makes accumulated gradients the mean
                # over the window, as one big batch would give.
                scaled = loss / self.accumulate if self.accumulate > 1 else loss
                self.scaler.scale(scaled).backward()

            if end_of_window:
                if self.spec.training.grad_clip_norm is not None:
                    self.scaler.unscale_(self.optimizer)  # clip true, not scaled, gradients
                    nn.utils.clip_grad_norm_(
                        self.model.parameters(), self.spec.training.grad_clip_norm
                    )
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step_batch()
                self.step += 1

            # The metrics take this rank's unweighted mean (summed over ranks at the end);
            # the window takes the weighted one, whose mean over ranks is the batch's loss.
            unweighted = loss / weight if weight != 1.0 else loss
            self.train_metrics.update(outputs, targets, per_output, unweighted, batch_size)
            self._window[self._window_len].copy_(loss.detach())
            self._window_len += 1
            self.batch_in_epoch = i + 1
            for cb in self.callbacks:
                cb.on_batch_end(self)

            if end_of_window and self.step % self.spec.training.log_every_n_steps == 0:
                self._flush_window(log=True)
            max_steps = self.spec.training.max_steps
            if end_of_window and max_steps is not None and self.step >= max_steps:
                self._stop_now(f"max_steps {max_steps} reached")  # the same step on every rank
            if end_of_window and self.preempt is not None and self.preempt():
                self.request_stop(PREEMPTED)
            if self._stop:
                break
        if self.stop_reason != PREEMPTED:  # a preempted window is saved, read on resume
            self._flush_window(log=False)

    def _sync_gradients(self, end_of_window: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP averages gradients in the backward of a window's last batch only: the
        batches accumulated before it keep theirs local (`no_sync`)."""
        if self.ddp is None or end_of_window:
            return contextlib.nullcontext()
        return self.ddp.no_sync()  # type: ignore[operator]

    def _flush_window(self, *, log: bool) -> None:
        """Read the window's losses (one sync): NaN guard, then the step metrics.

        Data-parallel, the window is first averaged over the ranks (every rank keeps
        every step, so their windows line up): all see the same losses, and a NaN
        on one rank stops them all at the same step."""
        n = self._window_len
        if n == 0:
            return
        window = self._window[:n]
        if self.ranks.distributed:
            window = self.collectives.sum_(window.clone()) / self.ranks.world_size
        values = window.tolist()
        first_step = self._window_first_step
        self._window_len = 0
        self._window_first_step = self.step
        if self.spec.callbacks.terminate_on_nan:
            bad = next((j for j, v in enumerate(values) if not math.isfinite(v)), -1)
            # Steps count from 1, as in the step metrics.
            stop, reason = nan_decision(-1 if bad < 0 else first_step + bad // self.accumulate + 1)
            if stop:
                raise RunFailed(f"{reason} (epoch {self.epoch})")
        if log:
            now = time.time()
            points = [
                MetricPoint("loss_step", sum(values) / n, self.step, self.epoch, now),
                MetricPoint(
                    "lr", float(self.optimizer.param_groups[0]["lr"]), self.step, self.epoch, now
                ),
            ]
            self._lr_logged_at = self.step
            self.reporter.log_metrics(points)
            for cb in self.callbacks:
                cb.on_log(self, points)
            if self.reporter.cancel_requested():
                self.request_stop("cancelled")
            self._agree_on_stop()

    @torch.inference_mode()
    def _validate(self, epoch: int) -> dict[str, float]:
        if self.val_batches is None:
            return {}
        self.model.eval()
        self.val_metrics.reset()
        self.collectives.broadcast_buffers(self.model)
        for inputs, targets in self.val_batches.epoch(epoch):
            with self._model_errors("validation"), self.autocast():
                outputs = self._forward(inputs, self.eval_model)
                loss, per_output = self.loss_fn(outputs, targets)
            batch_size = next(iter(targets.values())).shape[0]
            self.val_metrics.update(outputs, targets, per_output, loss, batch_size)
        return self.val_metrics.compute(self._reduce)

    def fit(self, *, resume_from: Path | None = None) -> RunResult:
        started = time.monotonic()
        # Each rank its own random stream (dropout masks differ across shares); rank 0's
        # is a one-process run's.
        seed_everything(self.spec.seed + self.ranks.rank)
        with contextlib.ExitStack() as teardown:
            # on_fit_end runs for every callback, in order, however fit() ends; an
            # error in one still lets the others run (ExitStack chains the errors).
            for cb in reversed(self.callbacks):
                teardown.callback(self._end_fit, cb)
            try:
                if resume_from is not None:
                    self.load_state(resume_from)
                for cb in self.callbacks:
                    cb.on_fit_start(self)
                self._fit_epochs()
            except BaseException as exc:
                for cb in self.callbacks:
                    cb.on_exception(self, exc)
                raise
        return self._result(started)

    def _end_fit(self, cb: Callback) -> None:
        if self.stop_reason != PREEMPTED:  # a preempted fit is not over: it resumes
            cb.on_fit_end(self)

    def _fit_epochs(self) -> None:
        epochs = self.spec.training.epochs
        while self.epoch < epochs and not self._stop:
            epoch = self.epoch
            epoch_started = time.monotonic()
            self._train_epoch(epoch)
            if self.stop_reason in ("cancelled", PREEMPTED):
                break
            metrics = self.train_metrics.compute(self._reduce)
            metrics.update(self._validate(epoch))
            elapsed = time.monotonic() - epoch_started
            metrics["epoch_time_s"] = elapsed
            metrics["samples_per_s"] = self.train_batches.num_samples / max(elapsed, 1e-9)
            metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
            self._check_finite_epoch(metrics)
            self.scheduler.step_epoch(metrics)
            self.epoch, self.batch_in_epoch = epoch + 1, 0
            self.last_metrics = metrics
            now = time.time()
            # `lr` is a step metric: skip it when this step's value was just logged.
            self.reporter.log_metrics(
                [
                    MetricPoint(name, value, self.step, epoch, now)
                    for name, value in metrics.items()
                    if not (name == "lr" and self._lr_logged_at == self.step)
                ]
            )
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, metrics)
            self._save_last(epoch)
            if self.reporter.cancel_requested():
                self.request_stop("cancelled")
            self._agree_on_stop()
        if self.stop_reason == PREEMPTED:
            self._save_preempted()

    def _check_finite_epoch(self, metrics: dict[str, float]) -> None:
        if not self.spec.callbacks.terminate_on_nan:
            return
        for name in ("loss", "val_loss"):
            if name in metrics and not math.isfinite(metrics[name]):
                raise RunFailed(f"{name} became NaN or Inf in epoch {self.epoch}")

    def _result(self, started: float) -> RunResult:
        ckpt = self.checkpoint
        status: Status = "succeeded"
        if self.stop_reason in ("cancelled", PREEMPTED):
            status = self.stop_reason  # type: ignore[assignment]
        return RunResult(
            status=status,
            epochs_run=self.epoch,
            steps=self.step,
            best_epoch=ckpt.state.best_epoch if ckpt else None,
            monitor=ckpt.monitor if ckpt else None,
            best_value=ckpt.state.best if ckpt else None,
            stopped_early=self.stopped_early,
            stop_reason=self.stop_reason,
            final_metrics=self.last_metrics,
            duration_s=time.monotonic() - started,
        )

    # ------------------------------------------------------ resumable state

    def _save_last(self, epoch: int) -> None:
        cfg = self.spec.callbacks.checkpoint
        if cfg is None or not cfg.save_last:
            return
        if (epoch + 1) % cfg.every_n_epochs != 0 and self.epoch < self.spec.training.epochs:
            return
        path = self.run_dir / "last.pt"
        self.save_state(path)
        self.reporter.log_checkpoint(CheckpointInfo("last", epoch, self.step, path))

    def _save_preempted(self) -> None:
        """A last.pt of this very step, mid-epoch: the resumed run continues bit-exactly.

        Saved when the spec keeps a last.pt at all (`save_last`); the epoch in the
        checkpoint's key is the one in progress, so the resumed run's save at the
        end of that epoch replaces it."""
        cfg = self.spec.callbacks.checkpoint
        if cfg is None or not cfg.save_last:
            return
        path = self.run_dir / "last.pt"
        self.save_state(path)
        self.reporter.log_checkpoint(CheckpointInfo("last", self.epoch, self.step, path))

    def _position(self) -> dict[str, Any] | None:
        """Where in an epoch a preempted run stopped (None at an epoch's end).

        The data order is a pure function of (seed, epoch), so the batch index is
        enough to skip to; the epoch's metric sums and the unlogged step losses of
        the current logging window go with it."""
        if self.stop_reason != PREEMPTED:
            return None
        return {
            "batch": self.batch_in_epoch,
            "train_metrics": self._by_rank(self.train_metrics.state_dict()),
            "window": self._by_rank(self._window[: self._window_len].detach().cpu().clone()),
            "window_first_step": self._window_first_step,
            "lr_logged_at": self._lr_logged_at,
        }

    def _by_rank(self, value: Any) -> Any:
        """A rank's own state, for last.pt: as is with one rank; data-parallel, every
        rank's in a list by rank (gathered on rank 0; None on the others)."""
        if not self.ranks.distributed:
            return value
        return self.collectives.gather(to_cpu(value))

    def _mine(self, saved: Any) -> Any:
        """This rank's entry of a `_by_rank` value read back from last.pt."""
        return saved[self.ranks.rank] if self.ranks.distributed else saved

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue as if never stopped.

        Data-parallel, every rank calls it at the same point (it gathers each rank's
        random state and position to rank 0), and rank 0's is the one to save."""
        return {
            # 2: callbacks keyed by `state_key` (1: by `name`), the scaler always saved.
            "format": 2,
            "spec_sha256": spec_digest(self.spec),
            "world_size": self.ranks.world_size,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),  # {} when disabled
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks},
            "rng": self._by_rank(rng_state(self.device)),
            # The data order is a pure function of (seed, epoch); kept for the record.
            "data_order": {"seed": self.spec.seed, "next_epoch": self.epoch},
            "position": self._position(),
        }

    def save_state(self, path: Path) -> None:
        state = self.state_dict()  # on every rank: it gathers theirs
        if self.ranks.is_zero:
            # On the CPU, so a machine without this GPU (or any) can load it.
            with atomic_path(path) as tmp:
                torch.save(to_cpu(state), tmp)

    def load_state(self, path: Path) -> None:
        state = read_state(path)
        if state.get("spec_sha256") != spec_digest(self.spec):
            raise RunFailed(
                "cannot resume: the spec's seed, data, model or training differ from the checkpoint's"
            )
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.ranks.world_size:
            # Each rank's random state (dropout) and place in a batch is its own: a run
            # split another way would not continue the same run.
            raise RunFailed(
                f"cannot resume: {path.name} was written by a run of {saved_world} rank(s), "
                f"this run has {self.ranks.world_size}: resume with the resources it was "
                f"started with"
            )
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # Empty from a disabled scaler, None in format 1 files without one: both
        # leave this run's scaler as built (an enabled one refuses an empty state).
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        keyed_by_name = state.get("format", 1) < 2
        for cb in self.callbacks:
            key = cb.name if keyed_by_name else cb.state_key
            if key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][key])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._window_first_step = self.step
        position = state.get("position")
        if position is not None:
            self._resume_batch = self.batch_in_epoch = int(position["batch"])
            self.train_metrics.load_state_dict(self._mine(position["train_metrics"]))
            window = self._mine(position["window"])
            self._window_len = len(window)
            self._window[: self._window_len].copy_(window.to(self._window.device))
            self._window_first_step = int(position["window_first_step"])
            self._lr_logged_at = int(position["lr_logged_at"])
        set_rng_state(self._mine(state["rng"]), self.device)


# ---------------------------------------------------------------- helpers


def read_state(path: Path) -> dict[str, Any]:
    """A saved training state (`last.pt`), loaded with weights_only: no pickle runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file
        raise RunFailed(
            f"cannot resume: {path.name} is not a readable training state ({one_line(exc)})"
        ) from None


def spec_digest(spec: JobSpec) -> str:
    """What must not change between a run and its resume (epochs may grow)."""
    fixed = spec.dump(include={"seed", "data", "model"})
    training = spec.dump(include={"training"})["training"]
    for key in ("epochs", "max_time_s", "device", "tf32"):
        training.pop(key)
    text = json.dumps({"fixed": fixed, "training": training}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """RNG states of the host and of the training GPU only: a resume may see other GPUs."""
    np_state: Any = np.random.get_state()  # the legacy tuple form
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def to_cpu(value: Any) -> Any:
    """A state dict with every tensor copied to the CPU (nested dicts, lists and tuples)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(v) for v in value)
    return value


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore the training GPU's generator from the saved one, whatever its index was.

    A state saved on the CPU leaves the GPU's seeded generator as is; one saved on a
    GPU is ignored by a CPU run. (Format 1 files before this kept a list of every GPU's.)"""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # every visible GPU's, by index: the first was the training one
        cuda = cuda[0] if cuda else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def is_out_of_memory(exc: BaseException) -> bool:
    # torch's CPU allocator raises a plain RuntimeError when memory runs out.
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or (
        isinstance(exc, RuntimeError)
        and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))
    )


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------- run_job


def run_job(
    spec: JobSpec,
    run_dir: Path,
    *,
    resolve: Callable[[str], Path] = Path,
    reporter: Reporter | None = None,
    callbacks: list[Callback] | None = None,
    resume: bool = False,
    max_params: int | None = None,
    preempt: Callable[[], bool] | None = None,
) -> RunResult:
    """Train `spec` into `run_dir`; write `result.json`; never raise for a failed run.

    A failed run (bad spec or data, a model that fails on the data, NaN, out of
    memory) returns status `failed` with a one-line reason; any other exception
    is a bug and propagates with its traceback.

    `max_params`: the model size limit, for local runs (the service checks its own
    limit when a job is submitted, so its workers pass none). `preempt`: asked
    after every optimizer step; True saves a mid-epoch last.pt and ends the run
    `preempted` (resume=True continues it bit-exactly).

    A data-parallel spec (resources: more than one rank) runs this once per rank,
    started by a launcher that sets torch.distributed's env vars
    (`worker.engine.launch`, torchrun): rank 0 reports to `reporter` and writes
    the files, the other ranks report nowhere."""
    ranks = Ranks.from_env()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not ranks.is_zero:
        reporter = NullReporter()
    reporter = reporter or FileReporter(run_dir)
    started = time.monotonic()
    trainer: Trainer | None = None
    try:
        problem = check_world(spec, ranks)
        if problem is not None:
            raise RunFailed(problem)
        device = torch.device(rank_device(spec, ranks) or "cpu")
        if ranks.distributed and device.type == "cpu":
            share_cpu_threads()
        with process_group(ranks, device):
            data = prepare(spec, resolve, max_params)
            trainer = Trainer(
                spec,
                data,
                run_dir,
                reporter=reporter,
                callbacks=callbacks,
                preempt=preempt,
                ranks=ranks,
            )
            last = run_dir / "last.pt"
            resume_from = last if resume and last.exists() else None
            if resume_from is not None and isinstance(reporter, FileReporter):
                reporter.truncate_after(int(read_state(last)["step"]))
            result = trainer.fit(resume_from=resume_from)
    except (SpecError, DataError, RunFailed) as exc:
        result = _failed(trainer, started, one_line(exc))
    except (RuntimeError, MemoryError) as exc:
        where = f" at epoch {trainer.epoch}, step {trainer.step}" if trainer else ""
        if ranks.distributed and is_peer_lost(exc):
            result = _failed(trainer, started, f"lost a rank of the run{where}: {one_line(exc)}")
            result.lost = True
        elif is_out_of_memory(exc):
            memory = "GPU memory" if isinstance(exc, torch.OutOfMemoryError) else "memory"
            reason = f"out of {memory}{where} (batch_size {spec.data.batch_size})"
            if type(exc) is RuntimeError:  # the CPU allocator's message says how much it wanted
                reason += f": {one_line(exc)}"
            result = _failed(trainer, started, reason)
        else:
            raise
    if ranks.is_zero:
        atomic_write_text(run_dir / "result.json", json.dumps(result.as_dict(), indent=2) + "\n")
    return result


def _failed(trainer: Trainer | None, started: float, reason: str) -> RunResult:
    result = RunResult(status="failed", error=reason, duration_s=time.monotonic() - started)
    if trainer is not None:
        partial = trainer._result(started)
        partial.status, partial.error = "failed", reason
        return partial
    return result


def iter_metrics(run_dir: Path) -> Iterator[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)
