"""Meta-training throughput against the machine's FLOP bound: streamed rows/s × FLOPs per row ÷ the FLOP/s of a
plain matmul measured in the same run.

KNOWN costs 8,832 multiply-adds per row forward; forward + backward ≈ 3× forward = 52,992 FLOPs per row. The
rows come as ``known.train`` streams them (Ray Data reads the shards, ``to_rows`` over ``--sweeps-per-block``
sweeps with biases repeated, ``epoch_batches``' shuffle buffer) into Ray Train workers running ``known.objective.train_step``
(``Objective``: the native kernel on the CPU, DDP between workers). ``--configs`` are workers × kernel threads
each: one worker on one core, two (DDP) on one each, one on two (all reserve 0.5 CPU, so Ray Data keeps a share).
Rows/s is the rank-0 worker's times the worker count (the shards are split evenly and DDP keeps the ranks in
step), over ``--epochs`` passes; the first batch (start-up) is not timed; ``in_step`` is the fraction of that time spent in ``train_step``
(the rest: waiting for batches). Target: >= 0.35 of the bound, for the best configuration. ``--in-memory``
also times the step on batches already in memory (not a target configuration: the step's own ceiling).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import KNOWN_MACS, best_of, emit

from known import registry
from known.batches import SHUFFLE_ROWS, epoch_batches, to_rows
from known.objective import Objective, optimizer, train_step
from known.train import require_counts
from meta import catalog, readers

FLOPS_PER_ROW = 6 * KNOWN_MACS


def _worker(cfg: dict) -> None:
    """Train on this worker's shard of the stream; report rows, seconds and distinct sweeps per batch."""
    import ray.train
    from ray.train.torch import prepare_model

    models = registry.fresh(0, "rms")
    objective = Objective(models, threads=cfg["threads"])
    opt = optimizer(objective, 1e-3)
    if ray.train.get_context().get_world_size() > 1:
        objective = prepare_model(objective)
    rows, mixing, t0, in_step, restarts = 0, [], None, 0.0, []
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(cfg["epochs"]):
        t_epoch = time.perf_counter()
        for i, batch in enumerate(epoch_batches(shard, cfg["batch_size"], cfg["shuffle_buffer"], epoch)):
            if epoch == 0 and i == 1:
                t0, rows, in_step = time.perf_counter(), 0, 0.0
            if epoch > 0 and i == 0:  # the stream is executed again for every epoch: its first batch waits
                restarts.append(time.perf_counter() - t_epoch)
            t_step = time.perf_counter()
            train_step(objective, opt, batch)
            in_step += time.perf_counter() - t_step
            rows += len(batch["y"])
            mixing.append(len(torch.unique(batch["sweep"])))
    seconds = time.perf_counter() - t0
    metrics = {"rows": rows, "seconds": seconds, "in_step": in_step / seconds, "sweeps_per_batch": float(np.mean(mixing)),
               "epoch_start_s": float(np.mean(restarts)) if restarts else None}
    with tempfile.TemporaryDirectory() as d:  # Ray Train v2 returns the metrics of the latest checkpoint only
        (Path(d) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _matmul_flops(n: int = 2048) -> float:
    """FLOP/s of an n×n matmul on this process's threads, best of 5 after a warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_of(lambda: a @ b, repeats=5)


def _in_memory(ds, args, threads: int, max_batches: int = 120) -> dict:
    """The same ``train_step`` on batches of the same stream already in this process's memory, the kernel on
    ``threads`` threads and torch's own ops on one: the step's ceiling when its input costs nothing."""
    batches = []
    for batch in epoch_batches(ds, args.batch_size, args.shuffle_buffer, 0):
        batches.append(batch)
        if len(batches) == max_batches:
            break
    models = registry.fresh(0, "rms")
    objective = Objective(models, threads=threads)
    opt = optimizer(objective, 1e-3)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_step(objective, opt, batches[0])  # warm-up: the kernel's first load
        t0 = time.perf_counter()
        for batch in batches[1:]:
            train_step(objective, opt, batch)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(saved)
    rows = sum(len(b["y"]) for b in batches[1:])
    return {"rows_per_s": round(rows / seconds), "rows": rows, "seconds": round(seconds, 2)}


def parse_args() -> tuple[argparse.Namespace, list[tuple[int, int]]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shards", default="runs/demo", help="a collected meta-dataset (default: make demo's)")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--shuffle-buffer", type=int, default=SHUFFLE_ROWS, help="as known.train's flag")
    p.add_argument("--sweeps-per-block", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1, help="passes over the stream, each executed again as in "
                   "known.train; from the second on, epoch_start_s is the wait for an epoch's first batch")
    p.add_argument("--bias-repeat", type=int, default=64)
    p.add_argument("--configs", nargs="+", default=["1x1", "2x1", "1x2"], metavar="WORKERSxTHREADS",
                   help="training workers × native-kernel threads each (default: one worker on one core, two on one "
                        "each (DDP), one on two)")
    p.add_argument("--in-memory", type=int, default=2, metavar="THREADS",
                   help="also time train_step on batches already in memory, the kernel on THREADS threads (0: skip); "
                        "not a target configuration: it shows what the step does when its input costs nothing")
    args = p.parse_args()
    require_counts(p, args, ("batch_size", "shuffle_buffer", "sweeps_per_block", "epochs", "bias_repeat"))
    try:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]
    except ValueError:
        p.error(f"--configs takes WORKERSxTHREADS such as 2x1, got {args.configs}")
    if any(len(c) != 2 or min(c) < 1 for c in configs):
        p.error(f"--configs takes WORKERSxTHREADS, each >= 1, got {args.configs}")
    return args, configs


def main() -> None:
    args, configs = parse_args()
    import ray
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(include_dashboard=False, log_to_driver=False)
    ids = {r["sweep_id"] for r in catalog.read(args.shards) if r["status"] == "done"}
    bound = _matmul_flops()
    out = {}

    def stream():
        return readers.ray_dataset(args.shards, where=lambda r: r["sweep_id"] in ids).map_batches(
            to_rows, batch_size=args.sweeps_per_block, fn_kwargs={"repeat": {"bias": args.bias_repeat}})

    for n, threads in configs:
        ds = stream()
        trainer = TorchTrainer(_worker, train_loop_config={**vars(args), "threads": threads}, datasets={"train": ds},
                               scaling_config=ScalingConfig(num_workers=n, resources_per_worker={"CPU": 0.5}),
                               dataset_config=DataConfig(datasets_to_split=["train"]),
                               run_config=RunConfig(name=f"train-throughput-{n}x{threads}", storage_path="/tmp/oblivion-bench"))
        m = trainer.fit().metrics
        rows_s = n * m["rows"] / m["seconds"]
        out[f"{n}x{threads}"] = {"rows_per_s": round(rows_s), "rows": n * m["rows"], "seconds": round(m["seconds"], 2), "sweeps_per_batch": round(m["sweeps_per_batch"], 1), "in_step": round(m["in_step"], 2),
                            "epoch_start_s": m["epoch_start_s"] and round(m["epoch_start_s"], 2)}
    if args.in_memory:
        out[f"in_memory_1x{args.in_memory}"] = _in_memory(stream(), args, args.in_memory)
    bound = max(bound, _matmul_flops())  # again, after: the faster of the two
    for v in out.values():
        v["of_bound"] = round(v["rows_per_s"] * FLOPS_PER_ROW / bound, 3)
    best = max((v for k, v in out.items() if not k.startswith("in_memory")), key=lambda v: v["of_bound"])
    emit("train_throughput", of_bound=best["of_bound"], target=">= 0.35", matmul_gflops=round(bound / 1e9, 1),
         flops_per_row=FLOPS_PER_ROW, configs=out,
         two_vs_one=round(out["2x1"]["rows_per_s"] / out["1x1"]["rows_per_s"], 3) if {"1x1", "2x1"} <= set(out) else None,
         sweeps=len(ids), batch_size=args.batch_size, sweeps_per_block=args.sweeps_per_block)


if __name__ == "__main__":
    main()
