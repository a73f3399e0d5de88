"""Cluster sizing from measured numbers: how many nodes and hours for a meta-dataset of a given size.

Reads a collected meta-dataset's catalog (per-sweep wall time of a 1-CPU, 1-thread worker; parameters) and
its shards (bytes), and KNOWN training throughput (rows/s per training worker, e.g. from
``bench/stream_throughput.py``), and prints a JSON line and a markdown table for infra/README.md.

    python bench/sizing.py --shards runs/meta --train-rows-per-s 190000 --target-gb 50
"""

from __future__ import annotations

import argparse
import collections
import math

from common import emit

from meta import catalog, storage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="runs/meta")
    p.add_argument("--target-gb", type=float, default=50.0)
    p.add_argument("--train-rows-per-s", type=float, required=True, help="measured KNOWN training rows/s per worker")
    p.add_argument("--cpus-per-node", type=int, default=16)
    p.add_argument("--hours", type=float, default=24.0, help="wall-clock budget for the collection")
    args = p.parse_args()
    rows = [r for r in catalog.read(args.shards) if r["status"] == "done"]
    fs, path = storage.resolve(args.shards)
    total_bytes = sum(i.size for i in storage.list_files(fs, storage.join(path, catalog.SHARDS_DIR), ".tar"))
    bytes_per_param = total_bytes / sum(r["n_params"] for r in rows)
    by = collections.defaultdict(list)
    for r in rows:
        by[(r["family"], r["dataset"])].append(r)
    table = []
    for (fam, ds), rs in sorted(by.items()):
        wall = sum(r["wall_s"] for r in rs) / len(rs)
        table.append({"family": fam, "dataset": ds, "sweeps": len(rs), "sweeps_per_cpu_hour": 3600 / wall,
                      "mb_per_sweep": bytes_per_param * sum(r["n_params"] for r in rs) / len(rs) / 1e6})
    mean_wall = sum(r["wall_s"] for r in rows) / len(rows)
    mean_bytes = total_bytes / len(rows)
    target = args.target_gb * 1e9
    sweeps = target / mean_bytes
    cpu_hours = sweeps * mean_wall / 3600
    nodes = math.ceil(cpu_hours / (args.cpus_per_node * args.hours))
    n_stages = rows[0]["n_stages"]
    train_rows = target / bytes_per_param * (n_stages - 5)  # a window per scalar per target stage
    emit("sizing", sweeps_measured=len(rows), mean_sweep_cpu_s=round(mean_wall, 1), mean_mb_per_sweep=round(mean_bytes / 1e6, 2),
         target_gb=args.target_gb, sweeps_needed=round(sweeps), cpu_hours=round(cpu_hours), nodes=nodes,
         cpus_per_node=args.cpus_per_node, hours=args.hours, train_rows_per_epoch=round(train_rows),
         train_hours_per_epoch_one_worker=round(train_rows / args.train_rows_per_s / 3600, 2), per_family_dataset=table)
    print("\n| family | dataset | sweeps measured | sweeps per CPU-hour | MB per sweep |\n|---|---|---|---|---|")
    for t in table:
        print(f"| {t['family']} | {t['dataset']} | {t['sweeps']} | {t['sweeps_per_cpu_hour']:.0f} | {t['mb_per_sweep']:.2f} |")
    print(f"\n{args.target_gb:g} GB ≈ {sweeps:,.0f} sweeps ≈ {cpu_hours:,.0f} CPU-hours ≈ {nodes} node{'s' if nodes != 1 else ''} × "
          f"{args.cpus_per_node} CPUs for {args.hours:g} h; KNOWN: {train_rows:.2e} rows per epoch ≈ "
          f"{train_rows / args.train_rows_per_s / 3600:.1f} h per epoch for one training worker at "
          f"{args.train_rows_per_s:,.0f} rows/s.")


if __name__ == "__main__":
    main()
