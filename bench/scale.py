"""Does the collection's bookkeeping cost the same per sweep at any size? The real scheduler, failure policy,
shard writer, catalog and readers, fed by simulated sweeps (``collectors.simulate``: a well-formed result with
tiny tensors in ~1 ms) on a local Ray cluster with many small workers, or (``--autoscaling NODES``) on Ray's
autoscaler with fake nodes (``collectors.fake_cluster``): the collection starts on a head with no worker CPU and
the autoscaler adds the nodes its workers ask for.

    python bench/scale.py --sizes 1000 10000 100000 --workers 16 [--kill]
    python bench/scale.py --sizes 1000 10000 --workers 16 --cpus 4 --autoscaling 4

One JSON line per N: driver CPU seconds per sweep, sweep completions per second (steady state: between 10% and
90% of them), catalog bytes written per sweep (write amplification), catalog parts, shards and their median size,
peak driver memory, ``meta.status`` (in process and as a command), a resume scan of the finished collection, and
the time ``known.train``'s stream takes to deliver its first batch. ``--kill`` then, at the largest N, kills a
collection's driver half-way (SIGKILL to its process group, Ray included) and reruns it: the line says how many
sweeps the rerun redid, and that none is duplicated. Ratios to N's first size come last (the targets: driver
time and catalog bytes per sweep within 1.5x of the smallest N).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit

from collectors.collect import collect
from collectors.config import SweepSpec, WorkerSettings
from collectors.data import DataSettings
from collectors.simulate import simulated_sweep
from meta import catalog, status, storage

REPO = Path(__file__).resolve().parents[1]
SIMULATED = DataSettings("/simulated-sweeps-read-no-data")


def specs(n: int) -> list[SweepSpec]:
    """``n`` distinct specs (only the seed differs): sweep ids as a real collection has them."""
    base = SweepSpec(family="cnn", arch={"depth": 2, "width": 8, "hidden": 16}, dataset="mnist", r=0.5, lr=1e-3,
                     batch_size=64, optimizer="adam", pretrain_epochs=1, n_stages=7, stage_epochs=1, train_size=1000,
                     test_size=None, seed=0)
    return [base.model_copy(update={"seed": i}) for i in range(n)]


def workers(n_workers: int, cpus: float, shard_seconds: float | None = None) -> WorkerSettings:
    """``n_workers`` sharing ``cpus``; a shard closes after ``shard_seconds`` (default: what a user gets)."""
    extra = {} if shard_seconds is None else {"shard_max_seconds": shard_seconds}
    return WorkerSettings(cpus_per_worker=cpus / n_workers, **extra)


def _steady_rate(marks: list[tuple[float, int]], n: int) -> float | None:
    """Completions per second between the 10% and 90% marks."""
    lo = next((t for t, c in marks if c >= 0.1 * n), None)
    hi = next((t for t, c in marks if c >= 0.9 * n), None)
    return 0.8 * n / (hi - lo) if lo is not None and hi is not None and hi > lo else None


def _first_batch_s(out: str) -> float:
    from known.batches import SHUFFLE_ROWS, epoch_batches, to_rows
    from meta import readers

    t0 = time.perf_counter()
    ds = readers.ray_dataset(out).map_batches(to_rows, batch_size=16)
    next(epoch_batches(ds, 8192, SHUFFLE_ROWS, 0))
    return time.perf_counter() - t0


def _shards(out: str) -> list[int]:
    fs, path = storage.resolve(out)
    return [i.size for i in storage.list_files(fs, storage.join(path, catalog.SHARDS_DIR), ".tar")]


def measure(n: int, n_workers: int, cpus: float, root: Path, shard_seconds: float | None) -> dict:
    out = str(root / f"n{n}")
    todo, marks = specs(n), []
    t0, c0 = time.perf_counter(), time.process_time()
    s = collect(todo, out, SIMULATED, workers(n_workers, cpus, shard_seconds), n_workers, runner=simulated_sweep,
                on_progress=lambda summary: marks.append((time.perf_counter(), summary.completed)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert (s.done, s.failed) == (n, 0), s.text()
    t1 = time.perf_counter()
    status.status(out)
    status_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "meta.status", out], cwd=REPO, check=True, capture_output=True)
    status_cli_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    again = collect(todo, out, SIMULATED, workers(n_workers, cpus, shard_seconds), n_workers, runner=simulated_sweep)
    resume_s = time.perf_counter() - t1
    assert (again.skipped, again.done) == (n, 0), again.text()
    sizes = _shards(out)
    rate = _steady_rate(marks, n)
    return dict(n=n, workers=n_workers, shard_seconds=shard_seconds, wall_s=round(wall, 1), driver_cpu_s_per_sweep=round(cpu / n, 6),
                completions_per_s=round(rate, 1) if rate else None, catalog_bytes_per_sweep=round(s.catalog_bytes / n, 1),
                catalog_parts=len(catalog.live(catalog.list_parts(out))), shards=len(sizes), shard_median_mb=round(statistics.median(sizes) / 2**20, 2),
                shard_bytes_per_sweep=round(sum(sizes) / n), peak_driver_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                status_s=round(status_s, 3), status_command_s=round(status_cli_s, 2), resume_scan_s=round(resume_s, 2),
                first_batch_s=round(_first_batch_s(out), 2))


def _child(args) -> None:
    """One collection in its own process (the driver ``--kill`` kills)."""
    collect(specs(args.child), args.out, SIMULATED, workers(args.workers, args.cpus, args.shard_seconds), args.workers,
            runner=simulated_sweep)


def kill_and_rerun(n: int, n_workers: int, cpus: float, root: Path, shard_seconds: float | None) -> dict:
    """A driver SIGKILLed half-way (its local Ray cluster with it), then the same collection again."""
    out = root / f"kill{n}"
    cmd = [sys.executable, __file__, "--child", str(n), "--out", str(out), "--workers", str(n_workers), "--cpus", str(cpus)]
    cmd += ["--shard-seconds", str(shard_seconds)] if shard_seconds is not None else []
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while proc.poll() is None and (not catalog.exists(str(out)) or catalog.read_table(str(out), ["status"]).num_rows < n // 2):
            time.sleep(1)
        assert proc.poll() is None, "the collection finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = catalog.read_table(str(out), ["status"]).num_rows
    t0 = time.perf_counter()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    table = catalog.read_table(str(out), ["status", "shard"])
    ids = [s.sweep_id for s in specs(n)]
    assert sorted(table.column("sweep_id").to_pylist()) == sorted(ids) and set(table.column("status").to_pylist()) == {"done"}
    from meta import readers

    seen = [s.key for s in readers.iter_sweeps(str(out), verify=False)]
    return dict(n=n, killed_with_catalogued=before, rerun_s=round(time.perf_counter() - t0, 1),
                all_done=True, sweeps_read=len(seen), duplicates=len(seen) - len(set(seen)))


def _start_cluster(cpus: float, nodes: int | None):
    """A local Ray cluster of ``cpus``, or an autoscaling head of 0 CPUs adding up to ``nodes`` fake nodes."""
    import ray

    if nodes is None:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        return None
    from collectors.fake_cluster import FakeAutoscalingCluster

    node = {"resources": {"CPU": int(cpus // nodes)}, "node_config": {}, "min_workers": 0, "max_workers": nodes}
    cluster = FakeAutoscalingCluster(0, {"cpu": node})
    cluster.start()
    cluster.connect()
    return cluster


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--workers", type=int, default=16, help="simulated workers (they share --cpus)")
    p.add_argument("--cpus", type=float, default=float(os.cpu_count() or 2), help="CPUs of the local Ray cluster")
    p.add_argument("--shard-seconds", type=float, default=None, help="close shards after this long (default: the "
                   "workers' default; small values make a catalog commit every few ms, as thousands of real workers do)")
    p.add_argument("--autoscaling", type=int, default=None, metavar="NODES", help="run on an autoscaling cluster "
                   "whose head has no CPU and whose fake nodes (up to NODES, --cpus / NODES CPUs each) it adds on demand")
    p.add_argument("--kill", action="store_true", help="also kill a driver half-way through the largest N and rerun")
    p.add_argument("--keep", default=None, help="keep the collections in this folder (default: a temporary one)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return _child(args)
    if min(args.sizes) < 100 or args.workers < 1:
        p.error(f"--sizes must be >= 100 and --workers >= 1, got {args.sizes} and {args.workers}")
    if args.autoscaling is not None and not 1 <= args.autoscaling <= args.cpus:
        p.error(f"--autoscaling must be between 1 and --cpus ({args.cpus:g}): each fake node has >= 1 CPU, got {args.autoscaling}")
    if args.autoscaling is not None:
        args.cpus = args.autoscaling * (args.cpus // args.autoscaling)  # whole CPUs per fake node
    import ray

    root = Path(args.keep or tempfile.mkdtemp(prefix="oblivion-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    cluster = _start_cluster(args.cpus, args.autoscaling)
    lines = []
    try:
        for n in sorted(args.sizes):
            lines.append(measure(n, args.workers, args.cpus, root, args.shard_seconds) | {"autoscaling_nodes": args.autoscaling})
            emit("scale", **lines[-1])
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    if len(lines) > 1:
        first, last = lines[0], lines[-1]
        emit("scale_ratios", n=[first["n"], last["n"]], target="<= 1.5",
             driver_cpu_per_sweep=round(last["driver_cpu_s_per_sweep"] / first["driver_cpu_s_per_sweep"], 2),
             catalog_bytes_per_sweep=round(last["catalog_bytes_per_sweep"] / first["catalog_bytes_per_sweep"], 2))
    if args.kill:
        emit("scale_kill", **kill_and_rerun(max(args.sizes), args.workers, args.cpus, root, args.shard_seconds))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
