"""Parallel scaling: sweeps per minute of the collection job with 2 workers vs 1 worker.

The same 8 small-CNN MNIST sweeps are collected with 1 worker and with 2 (one torch thread each), twice
in the order 1, 2, 1, 2, all in one Ray session started once; the figure is the median of the two ratios
(target >= 1.8 on a 2-core machine). Needs the real data (OBLIVION_DATA).
"""

from __future__ import annotations

import statistics
import tempfile

import ray
from common import emit, settings

from collectors.collect import collect
from collectors.config import parse_config


def main(rounds: int = 2, sweeps: int = 8) -> None:
    cfg = parse_config({
        "seed": 0, "num_sweeps": sweeps,
        "space": {"families": ["cnn"], "datasets": ["mnist"], "r": [0.5, 0.5], "lr": [1e-3, 1e-3],
                  "batch_size": [64, 64], "pretrain_epochs": 2, "train_size": 3000, "test_size": 2000},
        "workers": {"threads_per_worker": 1},
    })
    ray.init(log_to_driver=False)
    s = settings()
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for n in (1, 2):
            with tempfile.TemporaryDirectory() as d:
                summ = collect(cfg, d, s, num_workers=n)
                assert summ.done == sweeps, summ.text()
                rates[n].append(60 * sweeps / summ.wall_s)
    ratios = [b / a for a, b in zip(rates[1], rates[2])]
    emit("parallel_scaling", ratio_median=round(statistics.median(ratios), 3), ratios=[round(r, 3) for r in ratios],
         target=">= 1.8", sweeps_per_min_1_worker=[round(r, 2) for r in rates[1]],
         sweeps_per_min_2_workers=[round(r, 2) for r in rates[2]], sweeps_per_run=sweeps, cluster_cpus=ray.cluster_resources().get("CPU"))


if __name__ == "__main__":
    main()
