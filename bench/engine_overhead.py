"""Engine overhead: torchyard's training loop against a hand-written PyTorch loop.

Both train the same model (built from the same spec, same seed) on the same data
with the same optimizer, batch order and batch size, in one process. Prints
seconds per epoch (median over the timed epochs) and engine/plain, and the last
epoch's training loss of each: equal losses show that both did the same arithmetic
(with different batch orders, as this bench once had, the weights drift apart and
small convolutions ran up to 3x apart in speed, which says nothing of the loop).

Two clocks: wall time per epoch, and the CPU time of the training thread per
epoch (`time.thread_time`; torch runs on that one thread, `--threads 1`, the
default). On a shared machine the wall clock also measures the neighbours (pairs
of identical runs a few seconds apart differ by up to 25%); the thread's CPU time
measures the work done, so the goal is judged on it. The engine's CPU epoch runs
from one epoch's end to the next, so it includes everything the engine does per
epoch (metrics, the checkpoint decision and file), not only the batches.

    .venv/bin/python bench/engine_overhead.py [--epochs 3] [--repeats 5] [--rows 200000] [--threads 1]

Goal: engine/plain <= 1.03 on CPU. Exits non-zero only on an error.

`--whole`: whole processes, from the command to its exit. `torchyard train`
(`python -m app.cli train SPEC --out DIR -q`) of the MLP with a 10% validation
split, accuracy, best weights and last.pt each epoch, against bench/hand_loop.py,
a script doing that same work with torch alone; torch's default threads on both
sides; the sides' runs in a rotating order. Prints each repeat's ratios of wall
time and of the process's CPU time (user + system), their medians and spread,
and each side's last val_loss (equal: the same arithmetic). Goal: engine/plain
<= 1.02.

    .venv/bin/python bench/engine_overhead.py --whole [--epochs 3] [--repeats 4] [--rows 200000]
        [--also /path/to/another/checkout]  (its `torchyard train` too, in the same rotation)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.engine.batches import epoch_order  # noqa: E402
from worker.engine.build import build_model  # noqa: E402
from worker.engine.callbacks import Callback  # noqa: E402
from worker.engine.data import describe, resolve_fields  # noqa: E402
from worker.engine.spec import parse_spec  # noqa: E402
from worker.engine.train import iter_metrics, run_job  # noqa: E402

CASES = {
    "mlp 200k x 64": {
        "layers": [
            {"type": "linear", "out_features": 256},
            {"type": "relu"},
            {"type": "linear", "out_features": 256},
            {"type": "relu"},
            {"type": "linear", "out_features": 10},
        ],
        "shape": (64,),
        "batch_size": 512,
    },
    "cnn 8x8": {
        "layers": [
            {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
            {"type": "relu"},
            {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool2d", "kernel_size": 2},
            {"type": "flatten"},
            {"type": "linear", "out_features": 10},
        ],
        "shape": (1, 8, 8),
        "batch_size": 256,
    },
}


def make_data(path: Path, rows: int, shape: tuple[int, ...], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, *shape), dtype=np.float32)
    w = rng.standard_normal((int(np.prod(shape)), 10), dtype=np.float32)
    y = (x.reshape(rows, -1) @ w).argmax(1).astype(np.int64)
    np.savez(path, x=x, y=y)


def spec_for(case: dict, data: Path, epochs: int) -> dict:
    return {
        "name": "bench",
        "seed": 0,
        "data": {
            "train": str(data),
            "inputs": "x",
            "targets": "y",
            "batch_size": case["batch_size"],
        },
        "model": {"layers": case["layers"]},
        "training": {
            "epochs": epochs,
            "loss": "cross_entropy",
            "optimizer": {"type": "adam", "lr": 1e-3},
            "device": "cpu",
            "log_every_n_steps": 50,
        },
        "callbacks": {"checkpoint": {"monitor": "loss", "save_last": False}},
    }


def plain_loop(doc: dict, data: Path, epochs: int) -> tuple[list[float], float]:
    """What a careful person writes by hand: tensors in memory, batches by index.

    Returns (wall, thread CPU) seconds of each epoch and the last epoch's mean training loss."""
    spec = parse_spec(doc)
    inputs, targets = resolve_fields(spec.data, describe(data).fields)
    model = build_model(spec, inputs, targets, device="cpu").module
    arrays = np.load(data)
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    bs, n = spec.data.batch_size, len(x)
    times, cpu = [], []
    for epoch in range(epochs):
        started, started_cpu = time.perf_counter(), time.thread_time()
        model.train()
        order = epoch_order(n, spec.seed, epoch)  # the engine's order: the same batches
        total = torch.zeros(())
        for i in range(0, n, bs):
            index = order[i : i + bs]
            xb, yb = x.index_select(0, index), y.index_select(0, index)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.detach() * len(index)
        last_loss = (total / n).item()
        times.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - started_cpu)
    return times, cpu, last_loss


class ThreadClock(Callback):
    """The training thread's CPU time from the fit's start to each epoch's end."""

    name = "bench_thread_clock"

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self._last = 0.0

    def on_fit_start(self, trainer: object) -> None:
        self._last = time.thread_time()

    def on_epoch_end(self, trainer: object, epoch: int, metrics: dict[str, float]) -> None:
        now = time.thread_time()
        self.epochs.append(now - self._last)
        self._last = now


def engine(doc: dict, run_dir: Path) -> tuple[list[float], list[float], float]:
    clock = ThreadClock()
    result = run_job(parse_spec(doc), run_dir, callbacks=[clock])
    if result.status != "succeeded":
        raise SystemExit(f"engine run failed: {result.error}")
    points = list(iter_metrics(run_dir))
    last = result.epochs_run - 1
    losses = [p["value"] for p in points if p["name"] == "loss" and p["epoch"] == last]
    wall = [p["value"] for p in points if p["name"] == "epoch_time_s"]
    return wall, clock.epochs, losses[-1]


def whole_processes(args: argparse.Namespace) -> int:
    """`torchyard train` against bench/hand_loop.py, as processes: see the module's doc."""
    case = CASES["mlp 200k x 64"]
    # each side: (command maker, the tree whose code it runs)
    trees = {"engine": ROOT, **({"engine@also": args.also.resolve()} if args.also else {})}
    sides = ["plain", *trees]
    walls: dict[str, list[float]] = {side: [] for side in sides}
    cpus: dict[str, list[float]] = {side: [] for side in sides}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mlp.npz"
        make_data(data, args.rows, case["shape"])
        doc = spec_for(case, data, args.epochs)
        doc["data"]["validation"] = {"split": 0.1}
        doc["training"]["metrics"] = ["accuracy"]
        doc["callbacks"] = {"checkpoint": {"monitor": "val_loss"}}
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps(doc))
        for repeat in range(args.repeats):
            # rotated, so no side always runs first (or right after another)
            k = repeat % len(sides)
            for which in sides[k:] + sides[:k]:
                out = Path(tmp) / f"{which}-{repeat}"
                tree = trees.get(which, ROOT)
                if which == "plain":
                    command = [sys.executable, str(ROOT / "bench" / "hand_loop.py"), str(data)]
                    command += [str(out), "--epochs", str(args.epochs)]
                else:
                    command = [sys.executable, "-m", "app.cli", "train", str(spec), "--out"]
                    command += [str(out), "-q"]
                env = {**os.environ, "PYTHONPATH": str(tree)}
                started = time.perf_counter()
                process = subprocess.Popen(
                    command, env=env, cwd=tree, stdout=subprocess.PIPE, text=True
                )
                output, _ = process.communicate()
                walls[which].append(time.perf_counter() - started)
                if process.returncode != 0:
                    raise SystemExit(f"{which} run failed:\n{output}")
                if which == "plain":
                    losses[which] = float(output.split("val_loss")[-1])
                else:
                    result = json.loads((out / "result.json").read_text())
                    losses[which] = result["final_metrics"]["val_loss"]
                cpus[which].append(_children_cpu() - sum(sum(c) for c in cpus.values()))
    print(
        f"whole processes, {args.repeats} runs a side, {args.epochs} epochs of {args.rows:,} rows;"
        f" load average at the end {os.getloadavg()[0]:.1f}"
    )
    print(f"{'side':<12} {'clock':<5} {'s (median)':>10} {'/plain (median, min-max)':>28}")
    for side in sides:
        for name, clock in (("wall", walls), ("cpu", cpus)):
            ratios = [e / p for e, p in zip(clock[side], clock["plain"], strict=True)]
            print(
                f"{side:<12} {name:<5} {statistics.median(clock[side]):>10.2f}"
                f" {statistics.median(ratios):>12.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
                + ("" if side == "plain" else "  each: " + ", ".join(f"{r:.3f}" for r in ratios))
            )
    print("last val_loss: " + ", ".join(f"{side} {loss:.6f}" for side, loss in losses.items()))
    print("Goal: engine/plain wall <= 1.02")
    return 0


def _children_cpu() -> float:
    """User + system CPU seconds of all the children waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first untimed)")
    parser.add_argument("--repeats", type=int, default=5, help="pairs of runs per case")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--whole", action="store_true", help="whole processes (see above)")
    parser.add_argument("--also", type=Path, help="--whole: also the engine of this checkout")
    args = parser.parse_args()
    if args.whole:
        return whole_processes(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in CASES.items():
            short = name.split()[0]
            data = Path(tmp) / f"{short}.npz"
            make_data(data, args.rows if short == "mlp" else args.rows // 4, case["shape"])
            doc = spec_for(case, data, args.epochs)
            # Short runs, alternated ABBA, so each ratio compares runs seconds apart.
            wall: dict[str, list[float]] = {"plain": [], "engine": []}
            cpu: dict[str, list[float]] = {"plain": [], "engine": []}
            wall_ratios, cpu_ratios = [], []
            losses = {}
            for repeat in range(args.repeats):
                pair = {}
                for which in ("plain", "engine") if repeat % 2 == 0 else ("engine", "plain"):
                    if which == "plain":
                        pair[which] = plain_loop(doc, data, args.epochs)
                    else:
                        pair[which] = engine(doc, Path(tmp) / f"run-{short}-{repeat}")
                for which, (walls, cpus, loss) in pair.items():
                    # The first epoch of each run warms caches and allocators: not timed.
                    wall[which].append(statistics.median(walls[1:]))
                    cpu[which].append(statistics.median(cpus[1:]))
                    losses[which] = loss
                wall_ratios.append(wall["engine"][-1] / wall["plain"][-1])
                cpu_ratios.append(cpu["engine"][-1] / cpu["plain"][-1])
            rows_out.append(
                {
                    "case": name,
                    "plain_cpu_s": statistics.median(cpu["plain"]),
                    "engine_cpu_s": statistics.median(cpu["engine"]),
                    "cpu_ratio": statistics.median(cpu_ratios),
                    "cpu_ratios": cpu_ratios,
                    "plain_wall_s": statistics.median(wall["plain"]),
                    "engine_wall_s": statistics.median(wall["engine"]),
                    "wall_ratio": statistics.median(wall_ratios),
                    "wall_ratios": wall_ratios,
                    "plain_loss": losses["plain"],
                    "engine_loss": losses["engine"],
                }
            )
    print(
        f"{'case':<14} {'plain cpu s':>11} {'engine cpu s':>12} {'engine/plain cpu':>16}"
        f" {'plain wall s':>12} {'engine wall s':>13} {'engine/plain wall':>17}"
        f" {'last loss plain':>15} {'last loss engine':>16}"
    )
    for row in rows_out:
        print(
            f"{row['case']:<14} {row['plain_cpu_s']:>11.3f} {row['engine_cpu_s']:>12.3f}"
            f" {row['cpu_ratio']:>16.3f} {row['plain_wall_s']:>12.3f} {row['engine_wall_s']:>13.3f}"
            f" {row['wall_ratio']:>17.3f} {row['plain_loss']:>15.6f} {row['engine_loss']:>16.6f}"
        )
    for row in rows_out:
        for clock in ("cpu", "wall"):
            shown = ", ".join(f"{r:.3f}" for r in row[f"{clock}_ratios"])
            print(f"{row['case']}: engine/plain {clock} of each pair of runs: {shown}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{args.repeats} pairs of {args.epochs}-epoch runs per case; per epoch, seconds are "
        "medians and engine/plain the median of the pairs' ratios. Goal: cpu ratio <= 1.03"
    )
    if args.json:
        args.json.write_text(json.dumps(rows_out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
