"""How much of the machine does a sweep use, and how many sweeps does a CPU-hour buy? Both sweep paths
(``collectors.sweep.PATHS``: ``reference``, ``fast``) in the same run, one torch thread, each path in a process of
its own (the fast path tunes its process's allocator, which would otherwise speed up the reference beside it).

    OBLIVION_DATA=.data python bench/sweep_efficiency.py --unverified-cifar10 [--sweeps 5] [--steps 20]

1. Per family × dataset (MNIST, CIFAR-10): the first spec of ``--config`` with that family and dataset (its sampled
   architecture, batch size and learning rate). FLOPs of one training step (forward + backward) counted by
   ``torch.utils.flop_counter.FlopCounterMode``; the median step time of each path over ``--steps`` steps,
   the two paths interleaved in rounds; achieved FLOP/s as a fraction of the bound, a one-thread 512×512 matmul
   timed in the same processes (the best of its runs before and after). The bound is the machine's: on a core
   whose matmul is slow the same step is a larger fraction of it, so compare fractions within one run.
   One JSON line per cell.
2. ``--sweeps`` whole sweeps of the config's protocol (its first specs, the same on both paths, alternated):
   process CPU seconds per sweep split into training, evaluation, recording (``to_record`` and the shard's
   encoding) and data (loading, normalisation is inside training), and sweeps per CPU-hour of each path. CPU
   time, not wall time, so that other work on the machine does not tilt the ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from common import emit, settings
from torch.utils.flop_counter import FlopCounterMode

from collectors import data, sweep, zoo
from collectors.config import load_config, sample_spec
from meta.shards import encode_sample

CELL_DATASETS = ("mnist", "cifar10")


def matmul_flops(n: int = 512, repeats: int = 20) -> float:
    """FLOP/s of an n×n float32 matmul on this thread: the bound a training step is measured against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def first_spec(config, family: str, dataset: str, limit: int = 20000):
    """The config's first spec of this family and dataset: its sampled size, batch size and learning rate."""
    for i in range(limit):
        spec = sample_spec(config, i)
        if (spec.family, spec.dataset) == (family, dataset):
            return spec
    raise SystemExit(f"error: no {family}/{dataset} spec among the first {limit} of the config")


class Stepper:
    """One training step of ``spec``'s model on a fixed batch, on ``path``."""

    def __init__(self, spec, path: str):
        info = data.DATASETS[spec.dataset]
        torch.manual_seed(spec.seed)
        self.model = zoo.build(spec.family, spec.arch, info.channels, info.num_classes)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (spec.batch_size, info.channels, info.size, info.size), dtype=torch.uint8, generator=g)
        self.y = torch.randint(0, info.num_classes, (spec.batch_size,), generator=g)
        sweep.for_path(self.model, path, spec.dataset, self.x)
        self.opt = sweep._optimizer(spec.optimizer, self.model, spec.lr, foreach=path == "fast" or None)
        self.dataset, self.path = spec.dataset, path

    def __call__(self) -> None:
        loss = F.cross_entropy(self.model(sweep._inputs(self.dataset, self.x, self.path)), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            loss = F.cross_entropy(self.model(sweep._inputs(self.dataset, self.x, self.path)), self.y)
            loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()


_STEPPERS: dict[tuple, Stepper] = {}


def _steps(spec, path: str, n: int) -> list[float]:
    """Seconds of ``n`` steps of ``spec`` on ``path``, in this (path's own) process; the stepper is kept."""
    key = (spec.sweep_id, path)
    if key not in _STEPPERS:
        _STEPPERS[key] = s = Stepper(spec, path)
        s(), s()  # warm-up: oneDNN picks and caches its kernels
    return [_timed(_STEPPERS[key]) for _ in range(n)]


def _flops(spec) -> int:
    return Stepper(spec, "reference").flops()


def _one_thread() -> None:
    torch.set_num_threads(1)


def path_processes() -> dict[str, ProcessPoolExecutor]:
    """One single-thread worker process per path, kept for the whole run."""
    ctx = multiprocessing.get_context("spawn")
    return {p: ProcessPoolExecutor(1, mp_context=ctx, initializer=_one_thread) for p in sweep.PATHS}


def cell(spec, steps: int, procs: dict[str, ProcessPoolExecutor], rounds: int = 4) -> dict:
    """Median step time of both paths, interleaved: ``rounds`` rounds of ``steps // rounds`` steps each."""
    times = {p: [] for p in sweep.PATHS}
    for _ in range(rounds):
        for p, proc in procs.items():
            times[p] += proc.submit(_steps, spec, p, max(steps // rounds, 1)).result()
    flops = procs["reference"].submit(_flops, spec).result()
    return {"flops_per_step": flops, **{p: statistics.median(t) for p, t in times.items()}}


@contextmanager
def _timing_evaluation(into: list[float]):
    """Count the CPU seconds ``sweep.evaluate`` takes inside a sweep."""
    real = sweep.evaluate

    def timed(*args, **kwargs):
        c0 = time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            into.append(time.process_time() - c0)

    sweep.evaluate = timed
    try:
        yield
    finally:
        sweep.evaluate = real


def whole_sweep(spec, data_settings, path: str) -> dict:
    """CPU seconds of one sweep on ``path``, split into its parts."""
    data.load.cache_clear()
    c0 = time.process_time()
    data.load(spec.dataset, data_settings, True), data.load(spec.dataset, data_settings, False)
    data_s = time.process_time() - c0
    evals: list[float] = []
    c0 = time.process_time()
    with _timing_evaluation(evals):
        result = sweep.run_sweep(spec, data_settings, path=path)
    run_s = time.process_time() - c0
    c0 = time.process_time()
    encode_sample(sweep.to_record(result), result.tensors)
    record_s = time.process_time() - c0
    return {"data_s": data_s, "training_s": run_s - sum(evals), "evaluation_s": sum(evals), "recording_s": record_s,
            "total_s": data_s + run_s + record_s, "test_acc": [round(m.test_acc, 4) for m in result.stages]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/meta-v2.yaml", help="the protocol and the space the specs come from")
    p.add_argument("--steps", type=int, default=20, help="timed steps per path and cell (0: the whole sweeps only)")
    p.add_argument("--sweeps", type=int, default=5, help="whole sweeps per path (0: the step cells only)")
    p.add_argument("--unverified-cifar10", action="store_true", help="the rebuilt CIFAR-10 copy of ../shared/data")
    args = p.parse_args()
    if not (args.steps == 0 or args.steps >= 4) or args.sweeps < 0:
        p.error(f"--steps must be 0 or >= 4 and --sweeps >= 0, got {args.steps} and {args.sweeps}")
    _one_thread()  # as the path processes: the JSON lines report it
    config = load_config(args.config)
    procs = path_processes()
    try:
        if args.steps:
            step_cells(config, args.steps, procs)
        if args.sweeps:
            sweeps_per_cpu_hour(config, args.config, args.sweeps, procs)
    finally:
        for proc in procs.values():
            proc.shutdown()


def step_cells(config, steps: int, procs: dict[str, ProcessPoolExecutor]) -> None:
    bounds = [proc.submit(matmul_flops).result() for proc in procs.values()]
    cells = {(f, d): cell(first_spec(config, f, d), steps, procs) for f in zoo.FAMILIES for d in CELL_DATASETS}
    bound = max(bounds + [proc.submit(matmul_flops).result() for proc in procs.values()])
    fractions = {path: [] for path in sweep.PATHS}
    for (family, dataset), c in cells.items():
        row = {path: round(c["flops_per_step"] / c[path] / bound, 3) for path in sweep.PATHS}
        for path in sweep.PATHS:
            fractions[path].append(row[path])
        emit("sweep_step", family=family, dataset=dataset, gflops_per_step=round(c["flops_per_step"] / 1e9, 3),
             ms_reference=round(1e3 * c["reference"], 1), ms_fast=round(1e3 * c["fast"], 1),
             fraction_of_bound=row, speedup=round(c["reference"] / c["fast"], 2))
    emit("sweep_efficiency", bound_gflops=round(bound / 1e9, 1), cells=len(cells),
         median_fraction={p: round(statistics.median(f), 3) for p, f in fractions.items()},
         min_fraction={p: min(f) for p, f in fractions.items()}, target="median >= 0.30, none < 0.15")


def sweeps_per_cpu_hour(config, name: str, n: int, procs: dict[str, ProcessPoolExecutor]) -> None:
    s = settings()
    runs = {path: [] for path in sweep.PATHS}
    for i in range(n):
        spec = sample_spec(config, i)
        for path in sweep.PATHS if i % 2 == 0 else reversed(sweep.PATHS):
            runs[path].append(procs[path].submit(whole_sweep, spec, s, path).result())
            emit("sweep_whole", index=i, family=spec.family, dataset=spec.dataset, path=path,
                 **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in runs[path][-1].items()})
    total = {path: sum(r["total_s"] for r in rs) for path, rs in runs.items()}
    split = {path: {k: round(sum(r[k] for r in rs) / total[path], 3) for k in ("training_s", "evaluation_s", "recording_s", "data_s")}
             for path, rs in runs.items()}
    emit("sweeps_per_cpu_hour", sweeps=n, config=name, per_path={p: round(3600 * n / t, 2) for p, t in total.items()},
         ratio=round(total["reference"] / total["fast"], 2), share_of_cpu=split, target="ratio >= 1.8")


if __name__ == "__main__":
    main()
