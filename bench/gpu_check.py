"""GPU check: the CUDA paths of torchyard, run on a real GPU. A check that can fail.

    .venv/bin/python bench/gpu_check.py            # on a machine with an NVIDIA GPU
    .venv/bin/python bench/gpu_check.py --cpu      # this script's own plumbing, on a CPU

Exits 1 when anything is off, printing why: CUDA not usable (no driver, a driver
too old for the wheel, a GPU the wheel was not built for), or any check below.
Exits 2 on a machine with no NVIDIA device at all (nothing to check). Runs in a
few minutes on one GPU (digits data, small CNN); prints one table.

Checks (each a row; all on every visible GPU's behalf where it matters):
- cuda usable: every visible GPU runs a kernel (worker.gpus.cuda_problem).
- placement: weights and batches on the training GPU, which is also torch's
  current device (set_device); in-memory and streamed batches.
- autocast: bf16-mixed outputs bfloat16, 16-mixed float16; losses float32.
- grad scaler: 16-mixed has one; after an epoch its scale is finite and the
  optimizer really stepped (Adam's step count, weights changed).
- pinned: a DataLoader with 2 workers hands over pinned host buffers.
- no sync per step: torch.cuda.set_sync_debug_mode("error") over >= 300 real
  training steps (32, bf16-mixed, 16-mixed); the loss window read once per
  log_every_n_steps is the one sync the loop means to make, and is let through.
- deterministic: two `deterministic: true` runs, each a fresh `torchyard train`
  process, end with bit-identical weights.
- resume: a GPU run's last.pt holds CPU tensors only, resumes on the CPU, and
  that one resumes on the GPU again (and cuda:1 -> cuda:0 with two GPUs).
- data-parallel (>= 2 GPUs): `torchyard train` with `resources.gpus: 2` (NCCL, a
  rank per GPU) trains the digits CNN (BatchNorm synchronised, dropout out, plain
  SGD) to the weights one GPU trains with the same global batch (float
  tolerance), rank 0 alone writing; and a rank killed mid-run fails the launch
  (no rank left in a collective) and `--resume` finishes it.
- service: `torchyard serve --workers N` (N = GPUs, at most 2) runs jobs as the
  service does (queue, `--gpu i` worker, spawned child): `auto` jobs land on GPU
  workers, two GPUs run two jobs at once on different GPUs; a DataLoader-worker
  job and a compiled job succeed. Each job's best val_accuracy is within
  ACCURACY_TOLERANCE of the same spec trained on the CPU. With two GPUs, a job of
  `resources.gpus: 2` (queue gpu2) on `serve --gpus-per-worker 2`'s worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from examples.make_digits import write_digits  # noqa: E402
from worker.engine.spec import parse_spec  # noqa: E402
from worker.engine.train import Trainer, prepare, run_job, seed_everything  # noqa: E402
from worker.gpus import cuda_problem, driver_info  # noqa: E402

# Best val_accuracy of a GPU run may differ from the CPU run's by this much: the
# same seed, but other kernels (and bf16/fp16 rounding) take another path.
ACCURACY_TOLERANCE = 0.02
EPOCHS = 4
SYNC_STEPS = 300


class Check:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def run(self, name: str, fn: Callable[[], str]) -> None:
        started = time.perf_counter()
        try:
            detail, status = fn(), "PASS"
        except Exception as exc:  # every failure is a row, and the script goes on
            status = "FAIL"
            text = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {text[0] if text else ''}"
            traceback.print_exc()
        elapsed = time.perf_counter() - started
        self.rows.append((name, status, f"{detail} [{elapsed:.0f} s]"))
        print(f"{status}  {name}: {detail}", flush=True)

    def skip(self, name: str, why: str) -> None:
        self.rows.append((name, "SKIP", why))

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for _, status, _ in self.rows)

    def table(self) -> str:
        width = max(len(name) for name, _, _ in self.rows)
        lines = [f"{'check':<{width}}  result  detail", "-" * (width + 60)]
        lines += [f"{name:<{width}}  {status:<6}  {detail}" for name, status, detail in self.rows]
        return "\n".join(lines)


# ------------------------------------------------------------------ specs


def digits_spec(data: Path, device: str, **training: Any) -> dict[str, Any]:
    doc = json.loads((ROOT / "examples" / "digits_cnn.json").read_text())
    doc["data"].update(
        train=str(data / "digits_train.npz"), validation=str(data / "digits_val.npz")
    )
    doc["training"].update({"epochs": EPOCHS, "device": device, **training})
    doc["callbacks"] = {"checkpoint": {"monitor": "val_accuracy", "mode": "max"}}
    return doc


def trainer_for(doc: dict[str, Any], run_dir: Path) -> Trainer:
    spec = parse_spec(doc)
    data = prepare(spec, Path)
    trainer = Trainer(spec, data, run_dir)
    seed_everything(spec.seed)
    for cb in trainer.callbacks:
        cb.on_fit_start(trainer)
    return trainer


def first_batch(trainer: Trainer) -> tuple[dict, dict]:
    return next(iter(trainer.train_batches.epoch(0)))


# ------------------------------------------------------------------ checks


def check_placement(data: Path, tmp: Path, device: str) -> str:
    out = []
    for mode in ("always", "never"):
        doc = digits_spec(data, device)
        doc["data"].update(in_memory=mode, num_workers=0)
        trainer = trainer_for(doc, tmp / f"place-{mode}")
        where = trainer.device
        weights = {p.device for p in trainer.model.parameters()}
        assert weights == {where}, f"weights on {weights}, training device {where}"
        inputs, targets = first_batch(trainer)
        batch = {t.device for t in [*inputs.values(), *targets.values()]}
        assert batch == {where}, f"in_memory {mode}: batches on {batch}"
        if where.type == "cuda":
            current = torch.cuda.current_device()
            assert current == where.index, f"current device {current}, training on {where}"
        out.append(f"{mode}: {where}")
    return "weights+batches on the training device (" + ", ".join(out) + ")"


def check_autocast(data: Path, tmp: Path, device: str) -> str:
    found = []
    for precision, want in (("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)):
        if device == "cpu" and precision == "16-mixed":
            continue
        trainer = trainer_for(digits_spec(data, device, precision=precision), tmp / precision)
        inputs, targets = first_batch(trainer)
        with trainer.autocast():
            outputs = trainer._forward(inputs)
            loss, _ = trainer.loss_fn(outputs, targets)
        dtypes = {t.dtype for t in outputs.values()}
        assert dtypes == {want}, f"{precision}: outputs {dtypes}, expected {want}"
        assert loss.dtype == torch.float32, f"{precision}: loss {loss.dtype}"
        found.append(f"{precision} -> {str(want).removeprefix('torch.')}")
    return ", ".join(found) + "; losses float32"


def check_scaler(data: Path, tmp: Path, device: str) -> str:
    trainer = trainer_for(digits_spec(data, device, precision="16-mixed"), tmp / "scaler")
    assert trainer.scaler.is_enabled(), "16-mixed without an enabled grad scaler"
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer._train_epoch(0)
    scale = trainer.scaler.get_scale()
    assert math.isfinite(scale) and scale > 0, f"scale {scale}"
    steps = [int(s["step"]) for s in trainer.optimizer.state.values() if "step" in s]
    assert steps and max(steps) >= trainer.step * 0.9, (
        f"optimizer stepped {max(steps or [0])} of {trainer.step} steps (inf/NaN skips?)"
    )
    changed = any(
        not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)
    )
    assert changed, "weights did not change"
    return f"scale {scale:g} after {trainer.step} steps; optimizer stepped {max(steps)} times"


def check_pinned(data: Path, tmp: Path, device: str) -> str:
    doc = digits_spec(data, device)
    doc["data"].update(in_memory="never", num_workers=2)
    trainer = trainer_for(doc, tmp / "pinned")
    loader = trainer.train_batches.loader  # type: ignore[attr-defined]
    trainer.train_batches.sampler.epoch = 0  # type: ignore[attr-defined]
    inputs, targets = next(iter(loader))
    pinned = {t.is_pinned() for t in [*inputs.values(), *targets.values()]}
    assert pinned == {True}, f"host batches pinned: {pinned}"
    return "DataLoader(num_workers=2) hands over pinned host buffers"


def check_no_sync(data: Path, tmp: Path, precision: str) -> str:
    doc = digits_spec(data, "cuda", precision=precision, log_every_n_steps=100)
    doc["data"].update(batch_size=8, in_memory="always")
    trainer = trainer_for(doc, tmp / f"sync-{precision}")
    flush = trainer._flush_window

    def allowed_flush(*, log: bool) -> None:  # the one read of a logging window
        torch.cuda.set_sync_debug_mode(0)
        try:
            flush(log=log)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    trainer._flush_window = allowed_flush  # type: ignore[method-assign]
    epoch = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        while trainer.step < SYNC_STEPS:
            trainer._train_epoch(epoch)
            epoch += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return f"{trainer.step} steps, no host sync outside the log windows"


def tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensors(v)]
    return []


def check_resume(data: Path, tmp: Path, first: str, then: str) -> str:
    run = tmp / f"resume-{first}-{then}".replace(":", "")
    result = run_job(parse_spec(digits_spec(data, first, epochs=2)), run)
    assert result.status == "succeeded", result.error
    state = torch.load(run / "last.pt", weights_only=True)  # devices as saved
    devices = {t.device.type for t in tensors(state)}
    assert devices == {"cpu"}, f"last.pt holds tensors on {devices}"
    result = run_job(parse_spec(digits_spec(data, then, epochs=3)), run, resume=True)
    assert result.status == "succeeded" and result.epochs_run == 3, result.error
    result = run_job(parse_spec(digits_spec(data, first, epochs=4)), run, resume=True)
    assert result.status == "succeeded" and result.epochs_run == 4, result.error
    return f"{first} -> {then} -> {first}: 4 epochs, last.pt on the CPU"


def check_deterministic(data: Path, tmp: Path, device: str) -> str:
    """`deterministic: true`: two runs, each in a fresh process as the worker's training
    child is, end with bit-identical weights (cuBLAS needs CUBLAS_WORKSPACE_CONFIG set
    before CUDA starts: torchyard must set it itself, so it is not inherited here)."""
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    doc = digits_spec(data, device, deterministic=True, epochs=2)
    weights = []
    for name in ("deterministic-a", "deterministic-b"):
        run = torchyard_train(doc, tmp, name)
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        weights.append(torch.load(tmp / name / "last.pt", weights_only=True)["model"])
    first, second = weights
    differ = [key for key, value in first.items() if not torch.equal(value, second[key])]
    assert not differ, f"weights differ between the two runs: {differ[:5]}"
    return f"2 runs in fresh processes: all {len(first)} tensors of the weights bit-identical"


# ------------------------------------------------------------------ data-parallel


def ddp_spec(data: Path, **resources: Any) -> dict[str, Any]:
    """The digits CNN made exactly splittable: no dropout, plain SGD, BatchNorm synced."""
    doc = digits_spec(data, "cuda", sync_batchnorm=True, deterministic=True)
    doc["model"]["layers"] = [
        layer for layer in doc["model"]["layers"] if layer["type"] != "dropout"
    ]
    doc["training"].update(
        optimizer={"type": "sgd", "lr": 0.05}, scheduler=None, epochs=2, log_every_n_steps=10
    )
    doc["data"]["batch_size"] = 64
    doc["resources"] = resources
    return doc


def python_path() -> str:
    """This checkout first, then what PYTHONPATH already held (packages carried beside
    a machine's own Python, as on a lent GPU machine)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def torchyard_train(doc: dict[str, Any], tmp: Path, name: str, *extra: str) -> subprocess.Popen:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(doc))
    env = {**os.environ, "PYTHONPATH": python_path()}
    command = [sys.executable, "-m", "app.cli", "train", str(path), "-o", str(tmp / name), "-q"]
    return subprocess.Popen([*command, *extra], env=env, stderr=subprocess.PIPE, text=True)


def check_ddp_matches_one_gpu(data: Path, tmp: Path) -> str:
    one = run_job(parse_spec(ddp_spec(data)), tmp / "ddp-one")
    assert one.status == "succeeded", one.error
    two = torchyard_train(ddp_spec(data, gpus=2), tmp, "ddp-two")
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-2000:]
    a = torch.load(tmp / "ddp-one" / "last.pt", weights_only=True)
    b = torch.load(tmp / "ddp-two" / "last.pt", weights_only=True)
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    worst = 0.0
    for key, value in a["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(b["model"][key], value, rtol=1e-3, atol=1e-4)
            worst = max(worst, (b["model"][key] - value).abs().max().item())
    files = sorted(p.name for p in (tmp / "ddp-two").iterdir())
    assert files == ["best.safetensors", "last.pt", "metrics.jsonl", "result.json"], files
    return f"2 GPUs vs 1, same global batch: weights within {worst:.2e}; files: rank 0's only"


def check_ddp_rank_killed(data: Path, tmp: Path) -> str:
    import psutil

    doc = ddp_spec(data, gpus=2)
    doc["training"]["epochs"] = 30
    run = torchyard_train(doc, tmp, "ddp-killed")
    last = tmp / "ddp-killed" / "last.pt"
    while not last.exists() and run.poll() is None:
        time.sleep(0.05)
    ranks = sorted(
        (c.create_time(), c.pid)
        for c in psutil.Process(run.pid).children()
        if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())
    )
    assert run.poll() is None and len(ranks) == 2, "the run ended before a rank could be killed"
    started = time.monotonic()
    os.kill(ranks[1][1], 9)
    run.communicate(timeout=300)
    ended_after = time.monotonic() - started
    assert run.returncode == 1, run.returncode
    result = json.loads((tmp / "ddp-killed" / "result.json").read_text())
    assert "SIGKILL" in (result["error"] or ""), result
    resumed = torchyard_train(doc, tmp, "ddp-killed", "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert epoch == 30, epoch
    return f"rank 1 killed: launch failed {ended_after:.1f} s later; --resume finished 30 epochs"


# ------------------------------------------------------------------ the service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(tmp: Path, *args: str) -> Iterator[tuple[Any, Callable[..., Any]]]:
    """`torchyard serve ARGS` in a home of its own: a client, and `wait(condition, timeout)`
    that fails early (with the serve log) if serve exits."""
    from torchyard import Client

    port = free_port()
    env = {**os.environ, "PYTHONPATH": python_path(), "TORCHYARD_HOME": str(tmp / "home")}
    for key in ("TORCHYARD_TOKEN", "TORCHYARD_DATABASE_URL", "TORCHYARD_BROKER_URL"):
        env.pop(key, None)
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), *args],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def waiting(condition: Callable[[], Any], timeout: float) -> Any:
        return wait(condition, timeout, serve, log)

    try:
        token = waiting(lambda: re.search(r"TORCHYARD_TOKEN=(\S+)", log.read_text()), 120)
        url = f"http://127.0.0.1:{port}"
        waiting(lambda: ready(url), 120)
        yield Client(url, token.group(1)), waiting
    finally:
        os.killpg(serve.pid, 15)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, 9)


def check_service(
    data: Path, tmp: Path, gpus: int, cpu_best: dict[str, float], on: str = "cuda"
) -> str:
    """`on="cpu"` (--cpu): one auto job on a CPU worker, to test this check's own plumbing."""
    workers = max(1, min(gpus, 2))
    with served(tmp / "service", "--workers", str(workers)) as (client, waiting):
        train = client.datasets.upload(data / "digits_train.npz")["id"]
        val = client.datasets.upload(data / "digits_val.npz")["id"]

        def service_spec(device: str = "auto", **training: Any) -> dict[str, Any]:
            doc = digits_spec(data, device, **training)
            doc["data"].update(train=train, validation=val)
            return doc

        jobs = {f"auto {i}": client.submit(service_spec()).info for i in range(workers)}
        if on == "cuda":
            loader = service_spec(device="cuda")
            loader["data"].update(in_memory="never", num_workers=2)
            jobs["cuda, 2 loader workers"] = client.submit(loader).info
            jobs["cuda, compile"] = client.submit(service_spec(device="cuda", compile=True)).info
        done = {
            name: waiting(lambda j=job: ended(client, j["id"]), 420) for name, job in jobs.items()
        }
        problems, devices = [], {}
        for name, job in done.items():
            if job["status"] != "succeeded":
                problems.append(f"{name}: {job['status']}: {job.get('error')}")
                continue
            lines = client.job(job["id"]).logs()
            device = next((line for line in lines if line.startswith("device: ")), "")
            if not device.startswith(f"device: {on}"):
                problems.append(f"{name}: ran on {device or 'no device line'}")
            devices[name] = device
            best = (job.get("best") or {}).get("value")
            base = cpu_best["32"]
            if best is None or abs(best - base) > ACCURACY_TOLERANCE:
                problems.append(f"{name}: best val_accuracy {best} vs CPU {base:.4f}")
        if workers == 2:
            # Two workers, two GPUs: their device lines name different PCI addresses.
            a, b = devices.get("auto 0", ""), devices.get("auto 1", "")
            if a and a == b:
                problems.append(f"both auto jobs ran on the same GPU: {a}")
        assert not problems, "; ".join(problems)
        # "device: cuda:0 (NVIDIA H200, sm_90, 139 GiB, pci 0000:1a:00), ..." -> "pci 0000:1a:00"
        shown = sorted({d.split(", pci ")[-1].split(")")[0] for d in devices.values()})
        return f"{len(done)} jobs on {workers} {on} worker(s): {', '.join(shown)}"


def check_service_gpu_set(data: Path, tmp: Path, on: str = "cuda") -> str:
    """A 2-GPU job (queue gpu2) on a worker holding GPUs 0 and 1 (`--gpus-per-worker 2`).

    `on="cpu"` (--cpu): a job of 2 CPU ranks on a CPU worker, to test the plumbing."""
    with served(tmp / "gpu-set", "--workers", "1", "--gpus-per-worker", "2") as (
        client,
        waiting,
    ):
        if on == "cuda":
            doc, queue = ddp_spec(data, gpus=2), "gpu2"
        else:
            doc, queue = ddp_spec(data, processes=2), "cpu"
            doc["training"].update(device="cpu", sync_batchnorm=False)
        doc["data"].update(
            train=client.datasets.upload(data / "digits_train.npz")["id"],
            validation=client.datasets.upload(data / "digits_val.npz")["id"],
        )
        job = client.submit(doc).info
        assert job["queue"] == queue, job["queue"]
        done = waiting(lambda: ended(client, job["id"]), 420)
        assert done["status"] == "succeeded", f"{done['status']}: {done.get('error')}"
        lines = client.job(job["id"]).logs()
        device = next((line for line in lines if line.startswith("device: ")), "")
        assert device.startswith(f"device: {on}"), device or "no device line"
        return f"2 ranks on the worker's set (queue {queue}); rank 0 {device.split(' (')[0]}"


def ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ended(client: Any, job_id: str) -> dict[str, Any] | None:
    job = client.job(job_id).info
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None


def wait(condition: Callable[[], Any], timeout: float, proc: subprocess.Popen, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"gave up after {timeout:.0f} s; serve log: {log.read_text()[-2000:]}")


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu", action="store_true", help="run what a CPU can (tests this script's plumbing)"
    )
    args = parser.parse_args(argv)
    check = Check()
    device = "cpu" if args.cpu else "cuda"
    gpus = 0
    if not args.cpu:
        driver = driver_info()
        nvidia = driver.loaded or bool(driver.physical_gpus) or Path("/dev/nvidia0").exists()
        if not nvidia:
            print("no NVIDIA device here: nothing to check (run this where a GPU is lent)")
            return 2
        gpus = torch.cuda.device_count()
        for index in range(max(gpus, 1)):
            problem = cuda_problem(index)
            check.run(f"cuda usable: GPU {index}", lambda p=problem: _raise_if(p))
        if check.failed:
            print(check.table())
            return 1
        print(
            f"{gpus} GPU(s): {torch.cuda.get_device_name(0)}; torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, driver supports CUDA {driver.cuda_version}"
        )

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        data = tmp / "data"
        write_digits(data)
        cpu_best: dict[str, float] = {}

        def cpu_baseline() -> str:
            result = run_job(parse_spec(digits_spec(data, "cpu")), tmp / "cpu-32")
            assert result.status == "succeeded", result.error
            cpu_best["32"] = float(result.best_value or 0.0)
            return f"best val_accuracy {cpu_best['32']:.4f}"

        check.run("cpu baseline", cpu_baseline)
        check.run("placement + set_device", lambda: check_placement(data, tmp, device))
        if gpus >= 2:
            check.run("placement on cuda:1", lambda: check_placement(data, tmp, "cuda:1"))
        check.run("autocast dtypes", lambda: check_autocast(data, tmp, device))
        if args.cpu:
            for name in ("grad scaler", "pinned buffers", "no sync per step"):
                check.skip(name, "needs CUDA")
        else:
            check.run("grad scaler", lambda: check_scaler(data, tmp, device))
            check.run("pinned buffers", lambda: check_pinned(data, tmp, device))
            for precision in ("32", "bf16-mixed", "16-mixed"):
                check.run(
                    f"no sync per step ({precision})",
                    lambda p=precision: check_no_sync(data, tmp, p),
                )
        check.run("resume across devices", lambda: check_resume(data, tmp, device, "cpu"))
        check.run("deterministic: true", lambda: check_deterministic(data, tmp, device))
        if gpus >= 2:
            check.run(
                "resume cuda:1 -> cuda:0", lambda: check_resume(data, tmp, "cuda:1", "cuda:0")
            )
        if gpus >= 2:
            check.run("data-parallel 2 GPUs = 1 GPU", lambda: check_ddp_matches_one_gpu(data, tmp))
            check.run("data-parallel rank killed", lambda: check_ddp_rank_killed(data, tmp))
            check.run("service: a 2-GPU job", lambda: check_service_gpu_set(data, tmp))
        elif args.cpu:
            check.run("service: a 2-rank job", lambda: check_service_gpu_set(data, tmp, "cpu"))
        else:
            check.skip("data-parallel (2 GPUs)", "needs 2 GPUs")
        check.run(
            f"service on {device} workers",
            lambda: check_service(data, tmp, gpus, cpu_best, on=device),
        )

    print()
    print(check.table())
    print(f"accuracy tolerance vs CPU: {ACCURACY_TOLERANCE}")
    return 1 if check.failed else 0


def _raise_if(problem: str | None) -> str:
    if problem:
        raise RuntimeError(problem)
    return "runs a kernel"


if __name__ == "__main__":
    raise SystemExit(main())
