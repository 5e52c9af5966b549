"""Data-parallel scaling on CPUs: the MLP benchmark trained by 1 process, then by 2 ranks.

The workload is bench/engine_overhead.py's "mlp 200k x 64" (64 -> 256 -> 256 -> 10,
global batch 512, Adam), trained by the engine as `torchyard train` runs it: one
process, then two gloo ranks started by torch's elastic agent (worker.engine.launch),
each rank one intra-op thread (so 1 core against 2). Throughput is the engine's own
`samples_per_s` (global rows per epoch / epoch wall time), the median over the
epochs after the first. Communication is timed by a DDP comm hook around the
default allreduce: from a gradient bucket's launch to its completion, summed per
step (it runs beside the rest of the backward, so part of it is hidden).

    .venv/bin/python bench/ddp_scaling.py [--epochs 4] [--rows 200000] [--repeats 2] [--batch 512] [--no-comm-clock]

Goal: 2-process / 1-process throughput >= 1.7 (the limit is 2). On a machine whose
cores are shared with other work the figure says as much about the neighbours:
repeat it. Exits non-zero only on an error.

Beside it, torch alone: the same MLP and global batch in a hand-written loop (Adam,
batches by index), by 1 process and under DistributedDataParallel by 2 ranks, so
the figure can be split between the engine and torch's DDP on this machine.

It also measures the floor the machine sets: a bare gloo allreduce of the model's
gradients (one flat tensor of its parameter count) between two processes of one
thread, in a tight loop, and the best ratio that allows, t1 / (t1 / 2 + allreduce)
(the compute halved exactly, the last bucket's allreduce not hidden). `--batch`
changes the global batch, to show where the run stops being bound by it.

On a machine with GPUs, `--gpus N` measures weak scaling instead: a wide MLP
(1024 -> 4 x 4096 -> 10, 54M parameters: compute-bound) with a fixed batch per GPU,
trained on 1 GPU and on N (NCCL, a rank per GPU); efficiency per added GPU is
throughput(N) / (N x throughput(1)). Goal: >= 0.9.

    .venv/bin/python bench/ddp_scaling.py --gpus 8 [--batch-per-gpu 2048] [--precision 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_overhead import CASES, make_data, spec_for  # noqa: E402
from worker.engine.callbacks import Callback  # noqa: E402
from worker.engine.distributed import Ranks  # noqa: E402
from worker.engine.launch import launch_ranks  # noqa: E402
from worker.engine.spec import parse_spec  # noqa: E402
from worker.engine.train import RunResult, iter_metrics, run_job  # noqa: E402

CASE = "mlp 200k x 64"


class CommClock(Callback):
    """Times DDP's gradient allreduce per step with a comm hook; rank 0 writes the figure."""

    name = "bench_comm_clock"

    def __init__(self, out: Path):
        self.out = out
        self.seconds: list[float] = []

    def on_fit_start(self, trainer: Any) -> None:
        if trainer.ddp is None:
            return
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        # No annotations: DDP checks the hook's, and these would be strings here.
        def timed_allreduce(state, bucket):  # type: ignore[no-untyped-def]
            started = time.perf_counter()

            def done(fut: torch.futures.Future) -> torch.Tensor:
                state.append(time.perf_counter() - started)
                return fut.value()[0]

            return default_hooks.allreduce_hook(None, bucket).then(done)

        trainer.ddp.register_comm_hook(self.seconds, timed_allreduce)

    def on_fit_end(self, trainer: Any) -> None:
        if trainer.ranks.is_zero and trainer.step:
            figures = {"comm_s_per_step": sum(self.seconds) / trainer.step, "steps": trainer.step}
            self.out.write_text(json.dumps(figures))


def rank_entry(doc: dict[str, Any], run_dir: str, comm_file: str | None) -> RunResult:
    """One rank (spawned by the launcher: a module-level function); without a comm_file
    (`--no-comm-clock`) no comm hook, to show what the hook itself costs."""
    clock = [CommClock(Path(comm_file))] if comm_file else []
    return run_job(parse_spec(doc), Path(run_dir), callbacks=clock)


def allreduce_floor(numel: int, port_file: str, out_file: str, rank: int) -> None:
    """One process of the bare allreduce timing (spawned: a module-level function)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=_store(port_file, rank), rank=rank, world_size=2)
    grads = torch.randn(numel)
    for _ in range(50):
        dist.all_reduce(grads)
    times = []
    for _ in range(400):
        started = time.perf_counter()
        dist.all_reduce(grads)
        times.append(time.perf_counter() - started)
    if rank == 0:
        Path(out_file).write_text(json.dumps({"median_s": statistics.median(times)}))
    dist.destroy_process_group()


def bare_allreduce_ms(numel: int, tmp: Path) -> float:
    out = tmp / "floor.json"
    _spawn_two(allreduce_floor, (numel,), tmp / "floor-port", out)
    return 1000 * json.loads(out.read_text())["median_s"]


def bare_mlp(batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)]
    model = torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Linear(256, 10))
    return model, torch.randn(batch * 64, 64), torch.randint(0, 10, (batch * 64,))


def bare_steps(model: Any, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int) -> float:
    """Seconds a step of a plain loop: forward, loss, backward, Adam step, zero grads."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    rows = len(x) // batch * batch
    for i in range(steps // 10):  # warm-up
        j = i * batch % rows
        loss_fn(model(x[j : j + batch]), y[j : j + batch]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    started = time.perf_counter()
    for i in range(steps):
        j = i * batch % rows
        loss_fn(model(x[j : j + batch]), y[j : j + batch]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def bare_rank(batch: int, steps: int, port_file: str, out_file: str, rank: int) -> None:
    """One rank of torch's DDP on the bare loop (spawned: a module-level function)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=_store(port_file, rank), rank=rank, world_size=2)
    model, x, y = bare_mlp(batch)
    half = len(x) // 2  # this rank's rows (their values do not matter to the time)
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)
    mine = slice(rank * half, (rank + 1) * half)
    seconds = bare_steps(ddp, x[mine], y[mine], batch // 2, steps)
    if rank == 0:
        Path(out_file).write_text(json.dumps({"s_per_step": seconds}))
    dist.destroy_process_group()


def bare_ddp_ms(batch: int, steps: int, tmp: Path) -> tuple[float, float]:
    """ms a step: the bare loop by 1 process (1 thread), and by 2 DDP ranks."""
    torch.set_num_threads(1)
    model, x, y = bare_mlp(batch)
    one = 1000 * bare_steps(model, x, y, batch, steps)
    out = tmp / "bare.json"
    _spawn_two(bare_rank, (batch, steps), tmp / "bare-port", out)
    return one, 1000 * json.loads(out.read_text())["s_per_step"]


def _store(port_file: str, rank: int) -> Any:
    """A c10d TCPStore on a free port: rank 0 listens and says where in `port_file`."""
    import torch.distributed as dist

    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
        Path(port_file).write_text(str(store.port))
        return store
    while not Path(port_file).exists() or not Path(port_file).read_text():
        time.sleep(0.01)
    return dist.TCPStore("127.0.0.1", int(Path(port_file).read_text()), 2, is_master=False)


def _spawn_two(target: Any, args: tuple[Any, ...], port_file: Path, out_file: Path) -> None:
    import torch.multiprocessing as mp

    port_file.unlink(missing_ok=True)
    context = mp.get_context("spawn")
    procs = [
        context.Process(target=target, args=(*args, str(port_file), str(out_file), rank))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
        if proc.exitcode != 0:
            raise SystemExit(f"{target.__name__} failed (exit code {proc.exitcode})")


def parameter_count(doc: dict[str, Any], data: Path) -> int:
    from worker.engine.build import build_model
    from worker.engine.data import describe, resolve_fields

    spec = parse_spec(doc)
    inputs, targets = resolve_fields(spec.data, describe(data).fields)
    return sum(p.numel() for p in build_model(spec, inputs, targets).module.parameters())


def throughput(run_dir: Path) -> float:
    samples = [p["value"] for p in iter_metrics(run_dir) if p["name"] == "samples_per_s"]
    return statistics.median(samples[1:])  # the first epoch warms caches: not timed


WIDE_MLP = {
    "layers": [
        {"type": "linear", "out_features": 4096},
        {"type": "relu"},
        {"type": "linear", "out_features": 4096},
        {"type": "relu"},
        {"type": "linear", "out_features": 4096},
        {"type": "relu"},
        {"type": "linear", "out_features": 4096},
        {"type": "relu"},
        {"type": "linear", "out_features": 10},
    ],
    "shape": (1024,),
}


def run(
    doc: dict[str, Any],
    tmp: Path,
    name: str,
    processes: int,
    *,
    gpus: bool = False,
    comm_clock: bool = True,
) -> dict[str, Any]:
    run_dir, comm = tmp / name, tmp / f"{name}-comm.json"
    doc = {**doc, "resources": {"gpus" if gpus else "processes": processes}}
    if processes == 1:
        result = run_job(parse_spec(doc), run_dir)
    else:
        timed = str(comm) if comm_clock else None
        result = launch_ranks(
            rank_entry, (doc, str(run_dir), timed), nproc=processes, run_dir=run_dir
        )
    if result.status != "succeeded":
        raise SystemExit(f"{name} failed: {result.error}")
    figures = json.loads(comm.read_text()) if comm.exists() else {"comm_s_per_step": 0.0}
    return {
        "samples_per_s": throughput(run_dir),
        "ms_per_step": 1000
        * statistics.median(
            p["value"] for p in iter_metrics(run_dir) if p["name"] == "epoch_time_s"
        )
        / (result.steps / result.epochs_run),
        "comm_ms_per_step": 1000 * figures["comm_s_per_step"],
        "loss": result.final_metrics["loss"],
    }


def gpu_scaling(args: argparse.Namespace) -> int:
    """Weak scaling on this machine's GPUs: the same batch per GPU on 1 GPU and on N."""
    n = args.gpus
    if torch.cuda.device_count() < n:
        raise SystemExit(f"--gpus {n}: this machine has {torch.cuda.device_count()} GPU(s)")
    steps = 30
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        figures = {}
        for k in (1, n):
            data = tmp / f"wide-{k}.npz"
            make_data(data, args.batch_per_gpu * k * steps, WIDE_MLP["shape"])
            doc = spec_for({**WIDE_MLP, "batch_size": args.batch_per_gpu * k}, data, args.epochs)
            doc["training"].update(device="cuda", precision=args.precision)
            doc["data"]["in_memory"] = "always"
            figures[k] = run(doc, tmp, f"gpus-{k}", k, gpus=True)
    one, many = figures[1], figures[n]
    efficiency = many["samples_per_s"] / (n * one["samples_per_s"])
    print(f"{'run':<12} {'samples/s':>10} {'ms/step':>8} {'allreduce ms/step':>17}")
    for k, row in figures.items():
        print(
            f"{k} GPU(s)     {row['samples_per_s']:>10.0f} {row['ms_per_step']:>8.2f} "
            f"{row['comm_ms_per_step']:>17.2f}"
        )
    print(
        f"wide MLP (54M params), {args.batch_per_gpu} rows per GPU per step, precision "
        f"{args.precision}, {torch.cuda.get_device_name(0)}; torch {torch.__version__}. "
        f"Scaling efficiency {n} GPUs vs 1: {efficiency:.3f} (goal >= 0.9)"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the first untimed)")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (1 then 2 ranks)")
    parser.add_argument("--batch", type=int, help="global batch (default: the benchmark's 512)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--gpus", type=int, help="weak scaling on this many GPUs instead")
    parser.add_argument("--batch-per-gpu", type=int, default=2048)
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument(
        "--no-comm-clock",
        action="store_true",
        help="2 ranks without the comm hook that times the allreduce (its cost, by difference)",
    )
    args = parser.parse_args()
    if args.gpus:
        return gpu_scaling(args)
    # One intra-op thread per process, the ranks' too (they inherit the environment).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    assert Ranks.from_env().world_size == 1, "run this script itself without a launcher"
    case = dict(CASES[CASE])
    if args.batch:
        case["batch_size"] = args.batch
    pairs = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "mlp.npz"
        make_data(data, args.rows, case["shape"])
        doc = spec_for(case, data, args.epochs)
        for repeat in range(args.repeats):
            one = run(doc, tmp, f"one-{repeat}", 1)
            two = run(doc, tmp, f"two-{repeat}", 2, comm_clock=not args.no_comm_clock)
            pairs.append(
                {"one": one, "two": two, "ratio": two["samples_per_s"] / one["samples_per_s"]}
            )
        numel = parameter_count(doc, data)
        floor_ms = bare_allreduce_ms(numel, tmp)
        bare = [bare_ddp_ms(case["batch_size"], 1000, tmp) for _ in range(args.repeats)]
    print(
        f"{'run':<22} {'samples/s':>10} {'ms/step':>8} {'allreduce ms/step':>17} {'last loss':>10}"
    )
    for i, pair in enumerate(pairs):
        for label, key in (("1 process (baseline)", "one"), ("2 ranks, gloo", "two")):
            row = pair[key]
            print(
                f"{label:<22} {row['samples_per_s']:>10.0f} {row['ms_per_step']:>8.2f} "
                f"{row['comm_ms_per_step']:>17.2f} {row['loss']:>10.5f}"
            )
        print(f"pair {i}: 2 ranks / 1 process throughput = {pair['ratio']:.3f}")
    ratio = statistics.median(p["ratio"] for p in pairs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{CASE}, global batch {case['batch_size']}, {args.rows} rows, {args.epochs} epochs; "
        f"torch {torch.__version__}, {cores} cores, 1 thread per process. "
        f"2 ranks / 1 process throughput (median of {len(pairs)}): {ratio:.3f} (goal >= 1.7)"
    )
    for one_bare, two_bare in bare:
        print(
            f"torch alone (a plain loop, no torchyard): 1 process {one_bare:.2f} ms/step, "
            f"2 DDP ranks {two_bare:.2f} ms/step: 2 ranks / 1 process = {one_bare / two_bare:.3f}"
        )
    one_ms = statistics.median(p["one"]["ms_per_step"] for p in pairs)
    ceiling = one_ms / (one_ms / 2 + floor_ms)
    print(
        f"floor: a bare gloo allreduce of {numel:,} floats (the gradients) between 2 processes "
        f"takes {floor_ms:.2f} ms (median of 400) against {one_ms:.2f} ms for a whole step of "
        f"1 process: 2 ranks can reach at most {ceiling:.2f} here"
    )
    if args.json:
        figures = {"pairs": pairs, "floor_ms": floor_ms, "bare_ms": bare}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
