"""Collect forgetting sweeps into a meta-dataset (webdataset shards + parquet catalog).

    python collectors/launch.py --config configs/demo.yaml --out runs/demo --data-root .data
    ray job submit --working-dir . -- python collectors/launch.py --config … --out s3://bucket/meta

Running the same command again resumes: finished sweeps are skipped, unfinished ones are redone.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python collectors/launch.py`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collectors import data  # noqa: E402
from collectors.config import ConfigError, load_config, sample_specs  # noqa: E402
from meta import catalog, storage  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML collection config (see configs/demo.yaml)")
    p.add_argument("--out", required=True, help="output folder or URI (s3://…); holds catalog.parquet and shards/")
    p.add_argument("--data-root", default=None, help=f"dataset root in torchvision's layout (default: ${data.ENV_ROOT})")
    p.add_argument("--num-workers", type=int, default=None, help="worker actors (default: cluster CPUs / cpus_per_worker)")
    p.add_argument("--download", action="store_true", help="download missing datasets (needs internet)")
    p.add_argument("--unverified-cifar10", action="store_true",
                   help="load a locally rebuilt CIFAR-10 whose md5s differ from torchvision's (e.g. ../shared/data)")
    p.add_argument("--retry-failed", action="store_true", help="run sweeps the catalog records as failed again")
    return p.parse_args(argv)


def describe(out: str) -> str:
    """What the meta-dataset under ``out`` holds, for a human."""
    rows = catalog.read(out)
    done = [r for r in rows if r["status"] == "done"]
    by = collections.Counter((r["family"], r["dataset"]) for r in done)
    lines = [f"meta-dataset {out}: {len(done)} done, {len(rows) - len(done)} failed sweeps in {catalog.FILENAME}"]
    lines += [f"  {fam:<11} {ds:<13} {n}" for (fam, ds), n in sorted(by.items())]
    for r in done[:3]:
        accs = " ".join(f"{a:.3f}" for a in r["stage_test_acc"])
        lines.append(f"  e.g. {r['sweep_id']} ({r['family']}, {r['dataset']}, r={r['r']}): test acc by stage {accs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # everything that can be checked is checked before Ray starts
        config = load_config(args.config)
        if args.num_workers is not None and args.num_workers < 1:
            raise ConfigError(f"--num-workers must be >= 1, got {args.num_workers}")
        settings = data.DataSettings(data.resolve_root(args.data_root), args.download or config.data.download,
                                     args.unverified_cifar10 or config.data.unverified_cifar10)
        data.check_available(config.space.datasets, settings)
        storage.check_writable(args.out)
    except (ConfigError, data.DataError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from collectors.collect import collect  # imports Ray: only once the inputs are known to be good

    summary = collect(sample_specs(config), args.out, settings, config.workers, args.num_workers, args.retry_failed)
    print(summary.text())
    print(describe(storage.normalize(args.out)))
    return 0  # failed sweeps are recorded with their reason in the catalog and summarised above


if __name__ == "__main__":
    sys.exit(main())
