"""GPU check: the CUDA paths of the engine, run on a real GPU (never in CI).

    .venv/bin/python bench/gpu_check.py

Trains the digits CNN through the engine on `cuda` with each precision and both
data paths (tensors held on the GPU; a DataLoader with pinned memory), checks
where the weights and batches live, that 16-mixed uses a grad scaler, that the
results are close to a CPU run, and times each against the CPU. Prints a table;
exits non-zero only on an error.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.make_digits import write_digits  # noqa: E402
from worker.engine.spec import parse_spec  # noqa: E402
from worker.engine.train import prepare, run_job  # noqa: E402


def spec_for(data: Path, **training: object) -> dict:
    doc = json.loads((ROOT / "examples" / "digits_cnn.json").read_text())
    doc["data"].update(
        train=str(data / "digits_train.npz"), validation=str(data / "digits_val.npz")
    )
    doc["training"].update({"epochs": 5, **training})
    doc["callbacks"] = {"checkpoint": {"monitor": "val_accuracy", "mode": "max"}}
    return doc


def placement_check(doc: dict) -> str:
    """Weights, batches and the grad scaler where they belong, checked directly."""
    from worker.engine.train import Trainer

    spec = parse_spec(doc)
    data = prepare(spec, lambda ref: Path(ref))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(spec, data, Path(tmp))
        devices = {p.device.type for p in trainer.model.parameters()}
        inputs, targets = next(iter(trainer.train_batches.epoch(0)))
        batch_devices = {t.device.type for t in [*inputs.values(), *targets.values()]}
        scaler = trainer.scaler is not None
    assert devices == {"cuda"}, f"weights on {devices}"
    assert batch_devices == {"cuda"}, f"batches on {batch_devices}"
    if spec.training.precision == "16-mixed":
        assert scaler, "16-mixed without a grad scaler"
    return f"weights+batches on cuda, scaler={scaler}"


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing checked (run this where a GPU is lent)")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_digits(data)
        cases = {
            "cpu 32": spec_for(data, device="cpu"),
            "cuda 32": spec_for(data, device="cuda"),
            "cuda bf16-mixed": spec_for(data, device="cuda", precision="bf16-mixed"),
            "cuda 16-mixed": spec_for(data, device="cuda", precision="16-mixed"),
            "cuda:0 stream pinned": spec_for(data, device="cuda:0"),
            "cuda compile": spec_for(data, device="cuda", compile=True),
        }
        stream = cases["cuda:0 stream pinned"]
        stream["data"].update(in_memory="never", num_workers=2)
        for name, doc in cases.items():
            check = placement_check(copy.deepcopy(doc)) if name.startswith("cuda") else "-"
            started = time.perf_counter()
            result = run_job(parse_spec(doc), Path(tmp) / name.replace(" ", "_"))
            elapsed = time.perf_counter() - started
            if result.status != "succeeded":
                raise SystemExit(f"{name}: {result.error}")
            rows.append((name, result.best_value, elapsed, check))
    cpu_time = rows[0][2]
    print(f"{'case':<22} {'best val_acc':>12} {'time s':>8} {'vs cpu':>7}  checks")
    for name, best, elapsed, check in rows:
        print(f"{name:<22} {best:>12.4f} {elapsed:>8.2f} {elapsed / cpu_time:>7.2f}  {check}")
    worst = min(best for _, best, _, _ in rows)
    print(f"lowest best val_accuracy across cases: {worst:.4f} (CPU {rows[0][1]:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
