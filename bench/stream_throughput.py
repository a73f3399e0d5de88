"""Is KNOWN's trainer ever starved? Training rows/s fed by the streaming pipeline vs fed from memory.

Both run the same ``known.objective.train_step`` (three KNOWNs, one Adam step each per batch) on the same
meta-dataset:
- in memory: every window decoded up front into tensors, batches sliced from them (the ceiling);
- streaming: the pipeline ``known.train`` uses — Ray Data reads the shards with the safe decoder,
  ``to_rows`` turns sweeps into windows, ``known.batches.epoch_batches`` cuts batches through its shuffle buffer;
- the same stream through Ray Data's own local shuffle buffer (``iter_torch_batches(local_shuffle_buffer_size=…)``)
  instead, which ``known.train`` used before: its cost per row and the sweeps it mixes into a batch, for comparison.
Figure: streaming rows/s ÷ in-memory rows/s (target >= 0.8), same process, same batches per epoch.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import emit

from known import registry
from known.batches import SHUFFLE_ROWS, epoch_batches, to_rows
from known.objective import Objective, optimizer, train_step
from meta import catalog, readers


def _train(batches, seed: int) -> tuple[float, float | None]:
    """(rows/s, distinct sweeps per batch where the batches say)."""
    models = registry.fresh(seed, "rms")  # known.train's default input mode
    objective = Objective(models)
    opt = optimizer(objective, 1e-3)
    rows, t0, mixing = 0, None, []
    for i, batch in enumerate(batches):
        if i == 1:  # the first batch pays start-up (Ray Data's first read; cold caches): not throughput
            t0, rows = time.perf_counter(), 0
        train_step(objective, opt, batch)
        rows += len(batch["y"])
        if "sweep" in batch:
            mixing.append(len(torch.unique(batch["sweep"])))
    return rows / (time.perf_counter() - t0), round(float(np.mean(mixing)), 1) if mixing else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shards", default="runs/demo", help="a collected meta-dataset (default: make demo's)")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--shuffle-buffer", type=int, default=SHUFFLE_ROWS, help="as known.train's flag")
    p.add_argument("--sweeps-per-block", type=int, default=16, help="as known.train's flag")
    p.add_argument("--max-sweeps", type=int, default=8, help="sweeps to use (keeps the in-memory copy small)")
    args = p.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    ids = [r["sweep_id"] for r in catalog.read(args.shards) if r["status"] == "done"][: args.max_sweeps]
    keep = set(ids)

    def where(r):
        return r["sweep_id"] in keep

    # in memory: decode everything first (not timed), then train from tensors
    rows = []
    for ds_row in readers.ray_dataset(args.shards, where=where).iter_rows():
        rows.append(to_rows({k: [v] for k, v in ds_row.items()}))
    mem = {k: torch.from_numpy(np.concatenate([r[k] for r in rows])) for k in ("x", "y", "rms", "kind")}
    perm = torch.randperm(len(mem["y"]), generator=torch.Generator().manual_seed(0))
    mem = {k: v[perm] for k, v in mem.items()}
    n = len(mem["y"])
    in_memory = ({k: v[i : i + args.batch_size] for k, v in mem.items()} for i in range(0, n, args.batch_size))
    mem, _ = _train(in_memory, 0)

    def stream():
        return readers.ray_dataset(args.shards, where=where).map_batches(to_rows, batch_size=args.sweeps_per_block)

    ours, ours_mixing = _train(epoch_batches(stream(), args.batch_size, args.shuffle_buffer, 0), 0)
    ray_buffer, ray_mixing = _train(stream().iter_torch_batches(batch_size=args.batch_size, local_shuffle_buffer_size=args.shuffle_buffer,
                                                                local_shuffle_seed=0), 0)
    emit("stream_throughput", ratio=round(ours / mem, 3), target=">= 0.8", streaming_rows_per_s=round(ours),
         in_memory_rows_per_s=round(mem), sweeps_per_batch=ours_mixing, ray_shuffle_ratio=round(ray_buffer / mem, 3),
         ray_shuffle_rows_per_s=round(ray_buffer), ray_shuffle_sweeps_per_batch=ray_mixing, rows=n, sweeps=len(ids),
         batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer, sweeps_per_block=args.sweeps_per_block)


if __name__ == "__main__":
    main()
