"""Meta-training batches: sweeps become windows (one row per scalar and window), rows are mixed across sweeps
in runs (``to_rows``), then shuffled through a bounded buffer on each worker (``shuffled``); and which sweeps
train and which validate (``split``, by sweep id, never by scalar)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from known.model import S
from known.windows import KIND_IDS, is_validation, sweep_windows
from meta import readers
from meta.record import learned

# 262,144 rows (8.7 MB): batches of meta-v2 mixed 21.4 sweeps (min 16) against 16.1 (min 6) with 65,536 and
# 19.6 (min 16) through Ray Data's buffer of 65,536, which took 2.5x as long per row (bench/stream_throughput.py)
SHUFFLE_ROWS = 262_144
# to_rows permutes runs of 64 rows, not rows: 48 instead of 85 ns per row (16 meta-v2 sweeps, warm), the same
# 21.4 sweeps per batch after ``shuffled``
RUN_ROWS = 64


def to_rows(batch: dict, seed: int = 0, repeat: dict | None = None) -> dict:
    """Ray Data map_batches: sweeps (sweep_id, json, safetensors) -> one row per (scalar, window).

    The rows of every sweep in ``batch`` are permuted together, in runs of ``RUN_ROWS``, so that the batches
    cut from them mix that many sweeps (``--sweeps-per-block``; ``shuffled`` then mixes rows and blocks).
    ``repeat`` (kind -> n) repeats the rows of a rare kind n times: biases are ~0.03% of the scalars, so in a
    mixed batch of 8,192 rows the bias KNOWN would see about two per step. ``sweep`` numbers the sweep of each
    row (to count distinct sweeps per training batch)."""
    cols: dict[str, list] = {"x": [], "y": [], "rms": [], "kind": [], "sweep": []}
    for sid, js, st in zip(batch["sweep_id"], batch["json"], batch["safetensors"]):
        sample = readers.row_to_sample({"sweep_id": sid, "json": js, "safetensors": st})
        for kind, w in sweep_windows(sample).items():
            n = (repeat or {}).get(kind, 1)
            cols["x"].append(np.repeat(w.x, n, axis=0) if n > 1 else w.x)
            for name, v in (("y", w.y), ("rms", w.rms)):
                cols[name].append(np.repeat(v, n) if n > 1 else v)
            cols["kind"].append(np.full(len(w.y) * n, KIND_IDS[kind], dtype=np.int8))
            cols["sweep"].append(np.full(len(w.y) * n, int(sid[:7], 16), dtype=np.int32))  # 28 bits of the hex id
    if not cols["x"]:
        return {"x": np.zeros((0, S), np.float32), "y": np.zeros(0, np.float32), "rms": np.zeros(0, np.float32),
                "kind": np.zeros(0, np.int8), "sweep": np.zeros(0, np.int32)}
    out = {k: np.concatenate(v) for k, v in cols.items()}
    n = len(out["y"])  # mix layers and sweeps in runs of RUN_ROWS, which ``shuffled`` then mixes row by row
    runs = np.random.default_rng(seed).permutation(-(-n // RUN_ROWS)).astype(np.int64)
    order = (runs[:, None] * RUN_ROWS + np.arange(RUN_ROWS)).ravel()
    order = order[order < n]
    return {k: np.take(v, order, axis=0) for k, v in out.items()}


def shuffled(chunks: Iterable[dict], batch_size: int, buffer_rows: int, seed: int) -> Iterator[dict]:
    """Batches of ``batch_size`` rows drawn at random from a buffer of ``buffer_rows`` rows that ``chunks`` (dicts
    of equal-length tensors) refill; the rows left at the end too, the last batch partial.

    Ray Data's ``local_shuffle_buffer_size`` does the same at a cost the training process pays: on meta-v2 (2-core
    VM) its 65,536-row buffer passed 3.1-3.5M rows/s, this one 7.8-8.6M at 262,144 rows, none 11.5M. Here a
    refill moves the rows by one permutation of the pool (``bench/stream_throughput.py`` compares both)."""
    gen, pool = torch.Generator().manual_seed(seed), None

    def permuted(pool: dict) -> dict:  # numpy's take: 10 ns per row of x, torch's x[order] 61, index_select 19
        n = len(pool["y"])
        order = torch.randperm(n, generator=gen, dtype=torch.int32 if n < 2**31 else torch.int64).numpy()
        return {k: torch.from_numpy(np.take(v.numpy(), order, axis=0)) for k, v in pool.items()}

    for chunk in chunks:
        pool = chunk if pool is None else {k: torch.cat([pool[k], v]) for k, v in chunk.items()}
        n = len(pool["y"])
        if n >= buffer_rows + batch_size:
            pool, out = permuted(pool), (n - buffer_rows) // batch_size * batch_size  # >= buffer_rows rows stay
            yield from ({k: v[i : i + batch_size] for k, v in pool.items()} for i in range(0, out, batch_size))
            pool = {k: v[out:] for k, v in pool.items()}
    if pool is not None and len(pool["y"]):
        pool = permuted(pool)
        yield from ({k: v[i : i + batch_size] for k, v in pool.items()} for i in range(0, len(pool["y"]), batch_size))


def epoch_batches(shard, batch_size: int, buffer_rows: int, seed: int, device="cpu") -> Iterator[dict]:
    """One epoch of a training worker's batches on ``device``: its Ray Data shard (``to_rows``' rows) through
    ``shuffled``, which runs on the CPU."""
    chunks = shard.iter_torch_batches(batch_size=max(batch_size, buffer_rows), device="cpu")
    for batch in shuffled(chunks, batch_size, buffer_rows, seed):
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def training_rows(done: list[dict], keep_unlearned: bool = False) -> list[dict]:
    """The done catalog rows to meta-train on: a Θ0 that never learned has nothing to forget."""
    return [r for r in done if keep_unlearned or learned(r["stage_test_acc"][0])]


def split(rows: list[dict], val_fraction: float, train_fraction: float = 1.0) -> tuple[set[str], set[str]]:
    """(train ids, validation ids). ``train_fraction`` keeps a nested, deterministic part of the training
    sweeps (a size curve: ¼ ⊂ ½ ⊂ all) and never changes the validation sweeps."""
    val = {r["sweep_id"] for r in rows if is_validation(r["sweep_id"], val_fraction)}
    train = {r["sweep_id"] for r in rows if r["sweep_id"] not in val and is_validation("train:" + r["sweep_id"], train_fraction)}
    return train, val
