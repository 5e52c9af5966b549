"""A hand-written training script: the baseline of `engine_overhead.py --whole`.

What a careful person writes to do the work `torchyard train` does for the
bench's MLP spec, with torch alone (no torchyard import): read the NPZ, hold out
the same seeded 10% for validation, and per epoch train (the engine's batch
order), sum loss and accuracy on the device, log the step loss every 50 steps
(one read per window), validate, write the epoch's metrics, save the best
weights (safetensors) when val_loss improves and a resumable last.pt (model,
optimizer, RNG, epoch), both written atomically. Torch's default threads.

    python bench/hand_loop.py DATA.npz OUT_DIR [--epochs 3] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

SEED = 0
LOG_EVERY = 50


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    arrays = np.load(args.data)
    x_all, y_all = arrays["x"], arrays["y"]
    n = len(x_all)
    n_val = math.ceil(0.1 * n)
    order = np.random.default_rng(SEED).permutation(n)
    train_rows, val_rows = np.sort(order[: n - n_val]), np.sort(order[n - n_val :])
    x, y = torch.from_numpy(x_all[train_rows]), torch.from_numpy(y_all[train_rows])
    xv, yv = torch.from_numpy(x_all[val_rows]), torch.from_numpy(y_all[val_rows])

    torch.manual_seed(SEED)
    model = nn.Sequential(
        nn.Linear(x.shape[1], 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    bs = args.batch_size
    best = math.inf
    step = 0
    log = (args.out / "metrics.jsonl").open("w")
    for epoch in range(args.epochs):
        started = time.monotonic()
        model.train()
        perm = torch.randperm(
            len(x), generator=torch.Generator().manual_seed(SEED * 1_000_003 + epoch)
        )
        sums = torch.zeros(2, dtype=torch.float64)  # loss * rows, correct
        window = torch.zeros(LOG_EVERY)
        filled = 0
        for i in range(0, len(x), bs):
            index = perm[i : i + bs]
            xb, yb = x.index_select(0, index), y.index_select(0, index)
            out = model(xb)
            loss = loss_fn(out, yb)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            with torch.no_grad():
                sums[0] += loss.detach() * len(index)
                sums[1] += (out.argmax(1) == yb).sum()
                window[filled] = loss.detach()
            filled += 1
            if filled == LOG_EVERY:
                values = window.tolist()
                line = {"name": "loss_step", "value": sum(values) / filled, "step": step}
                log.write(json.dumps(line) + "\n")
                filled = 0
        model.eval()
        val = torch.zeros(2, dtype=torch.float64)
        with torch.inference_mode():
            for i in range(0, len(xv), bs):
                xb, yb = xv[i : i + bs], yv[i : i + bs]
                out = model(xb)
                val[0] += loss_fn(out, yb) * len(xb)
                val[1] += (out.argmax(1) == yb).sum()
        loss_sum, correct = sums.tolist()
        val_loss_sum, val_correct = val.tolist()
        metrics = {
            "loss": loss_sum / len(x),
            "accuracy": correct / len(x),
            "val_loss": val_loss_sum / len(xv),
            "val_accuracy": val_correct / len(xv),
            "epoch_time_s": time.monotonic() - started,
        }
        for name, value in metrics.items():
            log.write(
                json.dumps({"name": name, "value": value, "step": step, "epoch": epoch}) + "\n"
            )
        log.flush()
        if metrics["val_loss"] < best:
            best = metrics["val_loss"]
            weights = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(args.out / "best.tmp"))
            os.replace(args.out / "best.tmp", args.out / "best.safetensors")
        state = {
            "epoch": epoch + 1,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
        }
        torch.save(state, args.out / "last.tmp")
        os.replace(args.out / "last.tmp", args.out / "last.pt")
    log.close()
    print(f"loss {metrics['loss']:.6f} val_loss {metrics['val_loss']:.6f}")


if __name__ == "__main__":
    main()
