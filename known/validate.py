"""Validation that means something: predict a recorded stage from the five after it and compare.

For every selected sweep and window k (inputs Θk+1 … Θk+5, target Θk), each method predicts Θ̂k. We report
(a) the relative L1 error Σ|Θ̂k − Θk| / Σ|Θk+1 − Θk| over the predicted tensors, pooled over windows (1.0 = no better than
keeping the newest input), and (b) the test accuracy of Θ̂k on the sweep's own task, next to the accuracy of
Θk+1 (what we started from) and of the true Θk (what we aimed at), under three BatchNorm policies:
``keep`` (running statistics of Θk+1), ``reestimate`` (recomputed on source training images) and ``reset``
(initial values, what the official pipeline does).

    python -m known.validate --collection runs/demo --data-root .data --unverified-cifar10 --methods taskvector linearfit
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np
import torch
from torch import nn

from collectors import data, zoo
from collectors.config import SweepSpec
from collectors.sweep import evaluate, test_split
from known import KnownError, registry
from known.model import PREDICTED_KINDS, S
from known.predict import METHODS, reestimate_bn, retrodict
from known.relative_l1 import STEP, PooledL1
from known.windows import is_validation, window_targets
from meta import catalog, cli, readers, storage, verify
from meta.errors import OblivionError

BN_POLICIES = ("keep", "reestimate", "reset")
ALL = "all"  # one group: every predicted tensor of the window


def _reset_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.reset_parameters()


def _flat(state: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].reshape(-1).double() for n in names])


def validate_sweep(sample, methods: dict, settings: data.DataSettings, pooled: PooledL1, n_bn: int = 2000) -> list[dict]:
    """One row per window of the sweep (each method's relative L1 on it and accuracies under each BN policy);
    every error is also added to ``pooled``, which the summary reads."""
    spec = SweepSpec.model_validate(sample.record.spec)
    info = data.DATASETS[spec.dataset]
    torch.manual_seed(0)
    model = zoo.build(spec.family, spec.arch, info.channels, info.num_classes)
    kinds = zoo.tensor_kinds(model)
    test = test_split(spec, data.load(spec.dataset, settings, False))  # the images the sweep was scored on
    bn_images = data.load(spec.dataset, settings, True).x[:n_bn]
    stages = [{n: torch.from_numpy(np.array(t[k])) for n, t in sample.tensors.items()} for k in range(spec.n_stages)]

    def acc(state: dict, bn: str = "keep") -> float:
        model.load_state_dict(state)
        if bn == "reestimate":
            reestimate_bn(model, spec.dataset, bn_images)
        elif bn == "reset":
            _reset_bn(model)
        return evaluate(model, spec.dataset, test)[1]

    names = [n for n, k in kinds.items() if k in PREDICTED_KINDS]
    rows = []
    for k in window_targets(spec.n_stages):
        window = stages[k + 1 : k + 1 + S]  # Θk+1 (most data) … Θk+5
        l1, target = PooledL1(), _flat(stages[k], names)
        l1.add(ALL, STEP, _flat(window[0], names), target)
        row = {"sweep_id": sample.key, "family": spec.family, "dataset": spec.dataset, "target_stage": k,
               "acc_newest": acc(window[0]), "acc_true": acc(stages[k]),
               "acc_newest_reestimate": acc(window[0], "reestimate")}
        for name, models in methods.items():
            pred = retrodict(window, steps=1, method=name, models=models, kinds=kinds)[0]
            l1.add(ALL, name, _flat(pred, names), target)
            row[f"rel_l1_{name}"] = l1.ratio(name, [ALL])
            for bn in BN_POLICIES:
                row[f"acc_{name}_{bn}"] = acc(pred, bn)
        pooled.update(l1)
        rows.append(row)
    return rows


def summary_table(rows: list[dict], methods: list[str], pooled: PooledL1) -> str:
    """Markdown: one line per method; the relative L1 pooled over all windows, accuracies their means."""
    def mean(key):
        vals = [r[key] for r in rows if key in r]
        return statistics.fmean(vals) if vals else float("nan")

    lines = ["| method | rel. L1 (↓, 1 = newest) | acc, BN kept | acc, BN re-estimated | acc, BN reset |",
             "| --- | --- | --- | --- | --- |",
             f"| Θk+1 (input, newest) | 1 | {mean('acc_newest'):.4f} | {mean('acc_newest_reestimate'):.4f} | — |",
             f"| Θk (true target) | 0 | {mean('acc_true'):.4f} | — | — |"]
    for m in methods:
        lines.append(f"| {m} | {pooled.ratio(m, [ALL]):.4f} | {mean(f'acc_{m}_keep'):.4f} | "
                     f"{mean(f'acc_{m}_reestimate'):.4f} | {mean(f'acc_{m}_reset'):.4f} |")
    return "\n".join(lines) + f"\n\n{len(rows)} windows from {len({r['sweep_id'] for r in rows})} sweeps."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.Parser(prog="python -m known.validate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_collection(p, "--shards", required=True, help="the collection: a folder or URI")
    p.add_argument("--methods", nargs="+", default=["taskvector", "linearfit"], choices=METHODS)
    p.add_argument("--known", default=None, help="our KNOWN: models:/KNOWN@champion, models:/KNOWN/<v> or a folder (default: the shipped one)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of --known models:/… "
                   "(default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--official", default=None, help="folder with the authors' KNOWN_*.h5 (for known-official)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="only the validation split of known.train with this fraction (default: every sweep)")
    p.add_argument("--families", nargs="+", default=None, help="only sweeps of these architecture families")
    p.add_argument("--max-sweeps", type=int, default=None, help="at most this many sweeps (catalog order)")
    p.add_argument("--data-root", default=None, help=f"dataset root (default ${data.ENV_ROOT})")
    p.add_argument("--unverified-cifar10", action="store_true")
    p.add_argument("--json", default=None, help="also write every window's numbers to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.val_fraction is not None and not 0 < args.val_fraction < 1:
            raise KnownError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
        if args.max_sweeps is not None and args.max_sweeps < 1:
            raise KnownError(f"--max-sweeps must be >= 1, got {args.max_sweeps}")
        if args.json:
            storage.check_output(args.json, folder=False, flag="--json")
        cli.require_collection(args.collection)
        verify.require_intact(args.collection, catalog.read_table(args.collection, verify.COLUMNS))
        settings = data.DataSettings(data.resolve_root(args.data_root), unverified_cifar10=args.unverified_cifar10)
        if "known-official" in args.methods and not args.official:
            raise KnownError("--methods known-official needs --official DIR")
        sources = {"known": args.known, "known-official": args.official}
        methods = {m: registry.load_predictor(m, sources.get(m), args.tracking_uri) for m in args.methods}
    except (OblivionError, OSError) as e:  # OSError: a missing KNOWN file
        return cli.fail(e)

    def where(row: dict) -> bool:
        return ((args.val_fraction is None or is_validation(row["sweep_id"], args.val_fraction))
                and (args.families is None or row["family"] in args.families))

    rows, pooled = [], PooledL1()
    try:
        for i, sample in enumerate(readers.iter_sweeps(args.collection, where=where)):
            if args.max_sweeps is not None and i >= args.max_sweeps:
                break
            rows += validate_sweep(sample, methods, settings, pooled)
            print(f"validated {sample.key} ({sample.record.family}, {sample.record.dataset})",
                  file=sys.stderr, flush=True)
    except OblivionError as e:  # a shard whose bytes are not the catalogued ones, a missing dataset
        return cli.fail(e)
    if not rows:
        return cli.fail(f"no done sweeps with enough stages in {args.collection} (selected by --val-fraction, "
                        "--families)")
    print(summary_table(rows, list(methods), pooled))
    if args.json:
        storage.write_atomic(*storage.resolve(args.json), json.dumps(rows, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
