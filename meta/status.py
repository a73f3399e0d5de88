"""``python -m meta.status --collection DIR [--verify]``: what a meta-dataset holds and how its collection went.

Works on a local folder and on object storage (``s3://…``) alike, through ``meta.storage``; reads only the
catalog's columns it shows and the shard listing (never a shard's contents), so it is cheap while a collection
is running. ``--verify`` also hashes every catalogued shard against its recorded sha256 (a progress bar) and
exits 1 naming each damaged one; a resume of the collection moves those aside and runs their sweeps again.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from meta import catalog, cli, storage, verify
from meta.errors import OblivionError

COLUMNS = ["status", "error", "family", "dataset", "r", "wall_s", "finished_at", "stage_test_acc", "shard_bytes"]


@dataclass(frozen=True)
class Status:
    out: str
    done: int
    failed: int
    failures: Counter = field(default_factory=Counter)  # first line of the error -> sweeps
    cells: dict = field(default_factory=dict)  # (family, dataset) -> (done, failed)
    longest: dict = field(default_factory=dict)  # (family, dataset) -> the longest done sweep's wall seconds
    shard_bytes: int = 0
    cpu_hours: float = 0.0  # the done sweeps' wall time, one worker each
    sweeps_per_hour: float | None = None  # done sweeps between the first and the last one finished
    examples: tuple = ()  # a few done rows, for a human
    forgetting: Forgetting | None = None  # None without done sweeps of ≥ 2 stages


@dataclass(frozen=True)
class Forgetting:
    """Does a collection's protocol forget? Test accuracy of Θ0 (most data) against Θ1 and the last stage: a first
    stage that tests *better* than Θ0 on half the data says Θ0 was not converged (meta-v3's plain plateau)."""

    sweeps: int
    first_better: int  # sweeps whose Θ1 tests above Θ0
    first_change: float  # mean test accuracy Θ1 − Θ0, points (negative: it forgets)
    last_change: float  # mean test accuracy Θlast − Θ0, points


def _forgetting(accs: pa.ChunkedArray) -> Forgetting | None:
    """From the ``stage_test_acc`` lists with numpy over the flat values (no per-row Python)."""
    accs = accs.combine_chunks().drop_null()
    lengths = pc.list_value_length(accs).to_numpy(zero_copy_only=False)
    keep = lengths >= 2
    if not keep.any():
        return None
    values = pc.list_flatten(accs).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[keep]
    first, second, last = values[starts], values[starts + 1], values[starts + lengths[keep] - 1]
    return Forgetting(int(keep.sum()), int((second > first).sum()), float(100 * (second - first).mean()),
                      float(100 * (last - first).mean()))


def _rate(finished: pa.Array) -> float | None:
    """Sweeps per hour between the first and the last finished (ISO times: their string order is their order)."""
    finished = finished.drop_null()
    if len(finished) < 2:
        return None
    lo, hi = pc.min_max(finished).values()
    span = (datetime.fromisoformat(hi.as_py()) - datetime.fromisoformat(lo.as_py())).total_seconds()
    return 3600 * (len(finished) - 1) / span if span > 0 else None


def status(out: str) -> Status:
    """Counted with pyarrow's kernels, not row by row: 100,000 sweeps take well under a second."""
    table = catalog.read_table(out, COLUMNS)
    is_done = pc.equal(table["status"], "done")
    done, failed = table.filter(is_done), table.filter(pc.invert(is_done))
    cells: dict = {}
    for part, col in ((done, 0), (failed, 1)):
        for r in part.group_by(["family", "dataset"]).aggregate([("status", "count")]).to_pylist():
            counts = list(cells.get((r["family"], r["dataset"]), (0, 0)))
            counts[col] = r["status_count"]
            cells[(r["family"], r["dataset"])] = tuple(counts)
    longest = {(r["family"], r["dataset"]): r["wall_s_max"]  # what a --stop-after must leave room for
               for r in done.group_by(["family", "dataset"]).aggregate([("wall_s", "max")]).to_pylist()}
    fs, path = storage.resolve(out)
    return Status(
        out, done.num_rows, failed.num_rows,
        failures=Counter((e or "?").splitlines()[0][:200] for e in failed["error"].to_pylist()),
        cells=dict(sorted(cells.items(), key=lambda kv: tuple(map(str, kv[0])))),
        longest=longest,
        shard_bytes=sum(i.size for i in storage.list_files(fs, storage.join(path, catalog.SHARDS_DIR), ".tar")),
        cpu_hours=(pc.sum(done["wall_s"]).as_py() or 0.0) / 3600,
        sweeps_per_hour=_rate(done["finished_at"]),
        examples=tuple(done.slice(0, 3).to_pylist()),
        forgetting=_forgetting(done["stage_test_acc"]),
    )


def _longest(st: Status, cell: tuple) -> str:
    seconds = st.longest.get(cell)
    return f"; longest sweep {seconds / 60:.1f} min" if seconds is not None else ""


def text(st: Status) -> str:
    rate = f"{st.sweeps_per_hour:.1f}" if st.sweeps_per_hour is not None else "n/a"
    lines = [f"meta-dataset {st.out}: {st.done} done, {st.failed} failed or lost sweeps in its catalog",
             f"  shards: {st.shard_bytes:,} bytes; CPU-hours (sweep wall time, one worker each): {st.cpu_hours:.2f}; "
             f"sweeps per hour (first to last finished): {rate}"]
    if (f := st.forgetting) is not None:
        lines.append(f"  forgetting: test accuracy Θ0 → Θ1 {f.first_change:+.2f} points on average, Θ0 → last stage "
                     f"{f.last_change:+.2f}; Θ1 tests better than Θ0 in {f.first_better} of {f.sweeps} sweeps")
    lines += [f"  failed x{n}: {why}" for why, n in st.failures.most_common()]
    lines += [f"  {fam:<11} {ds:<13} {d} done" + (f", {f} failed" if f else "") + _longest(st, (fam, ds))
              for (fam, ds), (d, f) in st.cells.items()]
    for r in st.examples:
        accs = " ".join(f"{a:.3f}" for a in r["stage_test_acc"])
        lines.append(f"  e.g. {r['sweep_id']} ({r['family']}, {r['dataset']}, r={r['r']}): test acc by stage {accs}")
    return "\n".join(lines)


def verify_shards(out: str) -> list[verify.Damage]:
    """Every catalogued shard hashed, with a progress bar in bytes."""
    table = catalog.read_table(out, ["status", "shard", "shard_bytes", "shard_sha256"])
    cols = table.select(["shard", "shard_bytes", "status"]).to_pydict()
    sizes = {sh: b or 0 for sh, b, st in zip(cols["shard"], cols["shard_bytes"], cols["status"]) if st == "done"}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="sha256 of shards", file=sys.stderr) as bar:
        return verify.verify(out, table, on_shard=bar.update)


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(prog="python -m meta.status", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_collection(p, "out", required=True, help="the collection: a folder or a URI (s3://…)")
    p.add_argument("--verify", action="store_true", help="hash every shard against the catalog; exit 1 if any is damaged")
    args = p.parse_args(argv)
    out = storage.normalize(args.collection)
    try:
        cli.require_collection(out)
        print(text(status(out)))
        damaged = verify_shards(out) if args.verify else []
    except OblivionError as e:
        return cli.fail(e)
    except OSError as e:  # a missing bucket, no permission
        return cli.fail(f"cannot read {args.collection}: {e}")
    for d in damaged:
        print(f"damaged: shards/{d.shard}: {d.why} ({len(d.sweeps)} sweeps; rerun the collection to redo them)")
    if args.verify:
        print(f"verified: {len(damaged)} damaged shard(s)" if damaged else "verified: every shard matches its sha256")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
