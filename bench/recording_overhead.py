"""Recording overhead: a sweep with snapshots + shard writing vs the same training without.

Both variants run in this process, alternating A B A B, on the same spec; the figure is the median of the
per-pair ratios (target <= 1.05). Needs the real data (OBLIVION_DATA).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from common import cnn_spec, emit, settings

from collectors.sweep import run_sweep, to_record
from meta.shards import ShardWriter, encode_sample


def main(pairs: int = 3) -> None:
    torch.set_num_threads(1)
    spec, s = cnn_spec("mnist"), settings()
    run_sweep(spec, s, record=False)  # warm-up: data loading, allocator
    ratios, with_rec, without = [], [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(pairs):
            t0 = time.perf_counter()
            with ShardWriter(d, f"b{i}") as w:
                res = run_sweep(spec, s, record=True)
                w.write(encode_sample(to_record(res), res.tensors))
            a = time.perf_counter() - t0
            t0 = time.perf_counter()
            run_sweep(spec, s, record=False)
            b = time.perf_counter() - t0
            with_rec.append(a)
            without.append(b)
            ratios.append(a / b)
        shard_bytes = w.published[0].bytes
    emit("recording_overhead", ratio_median=round(statistics.median(ratios), 4), ratios=[round(r, 4) for r in ratios],
         target="<= 1.05", with_recording_s=[round(x, 2) for x in with_rec], without_s=[round(x, 2) for x in without],
         sweep_bytes=shard_bytes, spec=spec.model_dump(mode="json"))


if __name__ == "__main__":
    main()
