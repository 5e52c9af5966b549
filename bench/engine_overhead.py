"""Engine overhead: torchyard's training loop against a hand-written PyTorch loop.

Both train the same model (built from the same spec, same seed) on the same data
with the same optimizer, batch order and batch size, in one process. Prints
seconds per epoch (median over the timed epochs) and engine/plain, and the last
epoch's training loss of each: equal losses show that both did the same arithmetic
(with different batch orders, as this bench once had, the weights drift apart and
small convolutions ran up to 3x apart in speed, which says nothing of the loop).

    .venv/bin/python bench/engine_overhead.py [--epochs 3] [--repeats 5] [--rows 200000]

Goal: engine/plain <= 1.03 on CPU. Exits non-zero only on an error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.batches import epoch_order  # noqa: E402
from worker.build import build_model  # noqa: E402
from worker.data import describe, resolve_fields  # noqa: E402
from worker.spec import parse_spec  # noqa: E402
from worker.train import iter_metrics, run_job  # noqa: E402

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

    Returns the seconds of each epoch and the last epoch's mean training loss."""
    spec = parse_spec(doc)
    inputs, targets = resolve_fields(spec.data, describe(data).fields)
    model = build_model(spec, inputs, targets, device="cpu").module
    arrays = np.load(data)
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    bs, n = spec.data.batch_size, len(x)
    times = []
    for epoch in range(epochs):
        started = time.perf_counter()
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
    return times, last_loss


def engine(doc: dict, run_dir: Path) -> tuple[list[float], float]:
    result = run_job(parse_spec(doc), run_dir)
    if result.status != "succeeded":
        raise SystemExit(f"engine run failed: {result.error}")
    points = list(iter_metrics(run_dir))
    losses = [
        p["value"] for p in points if p["name"] == "loss" and p["epoch"] == result.epochs_run - 1
    ]
    return [p["value"] for p in points if p["name"] == "epoch_time_s"], losses[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first untimed)")
    parser.add_argument("--repeats", type=int, default=5, help="pairs of runs per case")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in CASES.items():
            short = name.split()[0]
            data = Path(tmp) / f"{short}.npz"
            make_data(data, args.rows if short == "mlp" else args.rows // 4, case["shape"])
            doc = spec_for(case, data, args.epochs)
            # Short runs, alternated ABBA: the speed of a shared machine drifts by tens
            # of percent within seconds, so each ratio compares runs seconds apart.
            ratios, plain_all, ours_all = [], [], []
            for repeat in range(args.repeats):
                pair = {}
                for which in ("plain", "engine") if repeat % 2 == 0 else ("engine", "plain"):
                    if which == "plain":
                        pair[which] = plain_loop(doc, data, args.epochs)
                    else:
                        pair[which] = engine(doc, Path(tmp) / f"run-{short}-{repeat}")
                # The first epoch of each run warms caches and allocators: not timed.
                plain = statistics.median(pair["plain"][0][1:])
                ours = statistics.median(pair["engine"][0][1:])
                ratios.append(ours / plain)
                plain_all.append(plain)
                ours_all.append(ours)
            rows_out.append(
                {
                    "case": name,
                    "plain_s": statistics.median(plain_all),
                    "engine_s": statistics.median(ours_all),
                    "ratio": statistics.median(ratios),
                    "ratios": ratios,
                    "plain_loss": pair["plain"][1],
                    "engine_loss": pair["engine"][1],
                }
            )
    print(
        f"{'case':<16} {'plain s/epoch':>14} {'engine s/epoch':>15} {'engine/plain':>13}"
        f" {'last loss plain':>16} {'last loss engine':>17}"
    )
    for row in rows_out:
        print(
            f"{row['case']:<16} {row['plain_s']:>14.3f} {row['engine_s']:>15.3f}"
            f" {row['ratio']:>13.3f} {row['plain_loss']:>16.6f} {row['engine_loss']:>17.6f}"
        )
    for row in rows_out:
        shown = ", ".join(f"{r:.3f}" for r in row["ratios"])
        print(f"{row['case']}: engine/plain of each pair of runs: {shown}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.repeats} pairs of {args.epochs}-epoch runs per case; "
        "engine/plain is the median of the pairs' ratios"
    )
    if args.json:
        args.json.write_text(json.dumps(rows_out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
