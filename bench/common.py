"""Shared bits of the benchmarks: a fixed small-CNN spec, the data settings, timing, JSON output.

The project's collectors are imported inside the functions that need them, so that a benchmark that needs only
torch (bench/gpu_predict.py, on a bare GPU image) can use the timing and the output too."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SMALL_CNN = {"depth": 3, "width": 16, "hidden": 64}
KNOWN_MACS = 8832  # KNOWN's multiply-adds per scalar, forward: the FLOP count the speed benchmarks are bound by


def cnn_spec(dataset: str, **over):
    from collectors.config import SweepSpec

    base = dict(family="cnn", arch=SMALL_CNN, dataset=dataset, r=0.5, lr=1e-3, batch_size=64, optimizer="adam",
                pretrain_epochs=2, n_stages=7, stage_epochs=1, train_size=4000, test_size=None, seed=0)
    return SweepSpec(**{**base, **over})


def settings(unverified_cifar10: bool = False):
    from collectors.data import DataSettings, resolve_root

    return DataSettings(resolve_root(None), unverified_cifar10=unverified_cifar10 or "--unverified-cifar10" in sys.argv)


def best_of(fn, repeats: int = 3, sync=lambda: None) -> float:
    """Seconds of ``fn``'s fastest run of ``repeats`` after a warm-up (``sync``: wait for the device first)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def emit(name: str, **fields) -> None:
    """One JSON line: the benchmark, the machine, and its figures."""
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
               "torch": torch.__version__}
    print(json.dumps({"bench": name, **fields, "machine": machine}), flush=True)
