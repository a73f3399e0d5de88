"""``python -m meta.status OUT``: what a meta-dataset holds and how its collection went, from its catalog.

Works on a local folder and on object storage (``s3://…``) alike, through ``meta.storage``; reads only the
catalog and the shard listing (never a shard's contents), so it is cheap while a collection is running.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from meta import catalog, storage


@dataclass(frozen=True)
class Status:
    out: str
    done: int
    failed: int
    failures: Counter = field(default_factory=Counter)  # first line of the error -> sweeps
    cells: dict = field(default_factory=dict)  # (family, dataset) -> (done, failed)
    shard_bytes: int = 0
    cpu_hours: float = 0.0  # the done sweeps' wall time, one worker each
    sweeps_per_hour: float | None = None  # done sweeps between the first and the last one finished
    examples: tuple = ()  # a few done rows, for a human


def _rate(finished: list[str]) -> float | None:
    times = sorted(datetime.fromisoformat(t) for t in finished if t)
    span = (times[-1] - times[0]).total_seconds() if len(times) > 1 else 0.0
    return 3600 * (len(times) - 1) / span if span > 0 else None


def status(out: str) -> Status:
    rows = catalog.read(out)
    fs, path = storage.resolve(out)
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] != "done"]
    cells: dict = {}
    for r in rows:
        d, f = cells.get((r["family"], r["dataset"]), (0, 0))
        cells[(r["family"], r["dataset"])] = (d + (r["status"] == "done"), f + (r["status"] != "done"))
    return Status(
        out, len(done), len(failed),
        failures=Counter((r["error"] or "?").splitlines()[0][:200] for r in failed),
        cells=dict(sorted(cells.items())),
        shard_bytes=sum(i.size for i in storage.list_files(fs, storage.join(path, catalog.SHARDS_DIR), ".tar")),
        cpu_hours=sum(r["wall_s"] or 0.0 for r in done) / 3600,
        sweeps_per_hour=_rate([r["finished_at"] for r in done]),
        examples=tuple(done[:3]),
    )


def text(st: Status) -> str:
    rate = f"{st.sweeps_per_hour:.1f}" if st.sweeps_per_hour is not None else "n/a"
    lines = [f"meta-dataset {st.out}: {st.done} done, {st.failed} failed sweeps in {catalog.FILENAME}",
             f"  shards: {st.shard_bytes:,} bytes; CPU-hours (sweep wall time, one worker each): {st.cpu_hours:.2f}; "
             f"sweeps per hour (first to last finished): {rate}"]
    lines += [f"  failed x{n}: {why}" for why, n in st.failures.most_common()]
    lines += [f"  {fam:<11} {ds:<13} {d} done" + (f", {f} failed" if f else "") for (fam, ds), (d, f) in st.cells.items()]
    for r in st.examples:
        accs = " ".join(f"{a:.3f}" for a in r["stage_test_acc"])
        lines.append(f"  e.g. {r['sweep_id']} ({r['family']}, {r['dataset']}, r={r['r']}): test acc by stage {accs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the collection's --out: a folder or a URI (s3://…)")
    args = p.parse_args(argv)
    out = storage.normalize(args.out)
    try:
        fs, path = storage.resolve(out)
        if not storage.exists(fs, storage.join(path, catalog.FILENAME)):
            print(f"error: no {catalog.FILENAME} under {out}: not a collection's output (yet)", file=sys.stderr)
            return 2
        print(text(status(out)))
    except OSError as e:  # StorageError, a missing bucket, no permission
        print(f"error: cannot read {args.out}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
