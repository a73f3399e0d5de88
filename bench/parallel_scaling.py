"""Parallel scaling: sweeps per minute of the collection job with 2 workers vs 1 worker.

12 sweeps of the same small CNN on MNIST (same size, different seeds, so that no worker idles at the end
waiting for a longer sweep) are collected with 1 worker and with 2 (one torch thread each), in the order
1, 2, 1, 2, in one Ray session started once. The wall time includes starting the workers and loading the
data, as a user's job does. Figure: the median ratio (target >= 1.8 on 2 cores). Needs OBLIVION_DATA.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

import ray
from common import cnn_spec, emit, settings

from collectors.collect import collect
from collectors.config import WorkerSettings


def _spec(seed: int):
    return cnn_spec("mnist", train_size=2000, test_size=2000, seed=seed)


def one_sweep() -> None:
    """Child mode: load the data, then time one sweep on one thread and print the seconds."""
    import torch

    from collectors import data
    from collectors.sweep import run_sweep

    torch.set_num_threads(1)
    s = settings()
    data.load("mnist", s, True), data.load("mnist", s, False)
    t0 = time.perf_counter()
    run_sweep(_spec(0), s)
    print(time.perf_counter() - t0)


def _raw(n: int) -> list[float]:
    procs = [subprocess.Popen([sys.executable, __file__, "--one-sweep"], stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return [float(p.communicate()[0]) for p in procs]


def main(rounds: int = 2, sweeps: int = 12) -> None:
    solo, pair = _raw(1)[0], _raw(2)
    specs = [_spec(i) for i in range(sweeps)]
    ray.init(log_to_driver=False)
    s = settings()
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for n in (1, 2):
            with tempfile.TemporaryDirectory() as d:
                summ = collect(specs, d, s, WorkerSettings(threads_per_worker=1), num_workers=n)
                assert summ.done == sweeps, summ.text()
                rates[n].append(60 * sweeps / summ.wall_s)
    ratios = [b / a for a, b in zip(rates[1], rates[2])]
    emit("parallel_scaling", ratio_median=round(statistics.median(ratios), 3), ratios=[round(r, 3) for r in ratios],
         target=">= 1.8", raw_pair_ratio=round(2 * solo / max(pair), 3), raw_solo_s=round(solo, 2),
         raw_pair_s=[round(x, 2) for x in pair], sweeps_per_min_1_worker=[round(r, 2) for r in rates[1]],
         sweeps_per_min_2_workers=[round(r, 2) for r in rates[2]], sweeps_per_run=sweeps,
         cluster_cpus=ray.cluster_resources().get("CPU"), spec=specs[0].model_dump(mode="json"))


if __name__ == "__main__":
    one_sweep() if "--one-sweep" in sys.argv else main()
