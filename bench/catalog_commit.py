"""What does recording one sweep in the catalog cost as the catalog grows? The append-only catalog
(``meta.catalog.append`` + ``compact``, what a collection does per commit) against rewriting the whole table
(what it did before: ``meta.catalog.write`` after every shard), in the same run, with realistic rows.

    python bench/catalog_commit.py --sizes 1000 10000 100000

Per N: a catalog of N rows is built, then ``--commits`` one-row commits are timed both ways; prints one JSON line
per N with milliseconds per commit, bytes written per commit and the ratio rewrite / append. With the
``deltalake`` package installed (not a dependency), ``--delta`` also times ``write_deltalake(mode="append")``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from common import emit

from meta import catalog


def rows(n: int, start: int = 0) -> list[dict]:
    """Done rows shaped like a real collection's (a ~600-byte spec JSON, per-stage lists of 7)."""
    rnd = random.Random(start)
    spec = json.dumps({"family": "cnn", "arch": {"depth": 3, "width": 16}, "pad": "x" * 520})
    return [{"sweep_id": f"{start + i:016x}", "status": "done", "attempts": 1, "shard": f"run-w{i % 64}-00000.tar",
             "shard_sha256": "%064x" % rnd.getrandbits(256), "shard_bytes": 2_000_000, "family": "cnn", "dataset": "mnist",
             "arch": '{"depth": 3}', "r": 0.5, "lr": 1e-3, "batch_size": 64, "optimizer": "adam", "n_stages": 7,
             "stage_test_acc": [rnd.random() for _ in range(7)], "stage_size": [1000 >> k for k in range(7)],
             "wall_s": 100.0, "spec": spec} for i in range(n)]


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def time_append(root: Path, n: int, commits: int) -> tuple[float, float]:
    base = rows(n)
    for i in range(0, n, 1000):  # built as a collection builds it: parts, merged as levels fill
        catalog.append(str(root), base[i : i + 1000], i + 1)
        catalog.compact(str(root))
    written, t0 = 0, time.perf_counter()
    for k, r in enumerate(rows(commits, start=n)):
        written += catalog.append(str(root), [r], n + 10 + k) + catalog.compact(str(root))
    return 1000 * (time.perf_counter() - t0) / commits, written / commits


def time_rewrite(root: Path, n: int, commits: int) -> tuple[float, float]:
    table = rows(n)
    catalog.write(str(root), table)
    t0 = time.perf_counter()
    for r in rows(commits, start=n):
        table.append(r)
        catalog.write(str(root), table)
    return 1000 * (time.perf_counter() - t0) / commits, float((root / catalog.FILENAME).stat().st_size)


def time_delta(root: Path, n: int, commits: int) -> float:
    from deltalake import write_deltalake

    write_deltalake(str(root), catalog._table(rows(n)))
    t0 = time.perf_counter()
    for r in rows(commits, start=n):
        write_deltalake(str(root), catalog._table([r]), mode="append")
    return 1000 * (time.perf_counter() - t0) / commits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--commits", type=int, default=20, help="one-row commits timed at each size")
    p.add_argument("--delta", action="store_true", help="also time deltalake appends (needs `pip install deltalake`)")
    args = p.parse_args()
    if args.commits < 1 or min(args.sizes) < 1:
        p.error(f"--commits and --sizes must be >= 1, got {args.commits} and {args.sizes}")
    for n in args.sizes:
        d = Path(tempfile.mkdtemp(prefix="catalog-bench-"))
        try:
            append_ms, append_bytes = time_append(d / "append", n, args.commits)
            rewrite_ms, rewrite_bytes = time_rewrite(d / "rewrite", n, args.commits)
            extra = {"delta_append_ms": round(time_delta(d / "delta", n, args.commits), 2)} if args.delta else {}
            emit("catalog_commit", n=n, append_ms=round(append_ms, 2), rewrite_ms=round(rewrite_ms, 2),
                 rewrite_over_append=round(rewrite_ms / append_ms, 1), append_bytes_per_commit=round(append_bytes),
                 rewrite_bytes_per_commit=round(rewrite_bytes), catalog_files=len(catalog.list_parts(str(d / "append"))),
                 **extra)
        finally:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
