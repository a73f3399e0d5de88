"""How long Θ0 must train before its training loss plateaus (the protocol study's Θ0 length).

Trains Θ0 of the first spec of each family × dataset in a config at the spec's learning rate, constant, for
``--epochs`` epochs, and reports per spec the first epoch whose training loss is within ``--tol`` of the
best loss reached (the plateau), with the whole loss curve. Prints one JSON line.

    OBLIVION_DATA=.data .venv/bin/python bench/theta0_plateau.py --config configs/protocols/long-cosine.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from collectors import data, sweep, zoo  # noqa: E402
from collectors.config import load_config, sample_specs  # noqa: E402


def loss_curve(spec, settings, epochs: int) -> list[float]:
    info = data.DATASETS[spec.dataset]
    train = data.load(spec.dataset, settings, True)
    torch.manual_seed(spec.seed)
    model = zoo.build(spec.family, spec.arch, info.channels, info.num_classes)
    idx = sweep.nested_subsets(len(train), spec.train_size, spec.r, spec.n_stages, spec.seed)[0]
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    return [sweep.train_epochs(model, opt, train, idx, spec.dataset, spec.batch_size, 1, gen)[1] for _ in range(epochs)]


def plateau_epoch(curve: list[float], tol: float) -> int:
    best = min(curve)
    return next(i + 1 for i, v in enumerate(curve) if v <= best * (1 + tol) + 1e-3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/protocols/long-cosine.yaml")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--tol", type=float, default=0.10, help="within this fraction of the best loss counts as plateaued")
    args = p.parse_args()
    torch.set_num_threads(1)
    settings = data.DataSettings(data.resolve_root(os.environ.get(data.ENV_ROOT)), unverified_cifar10=True)
    firsts = {}
    for s in sample_specs(load_config(args.config)):
        firsts.setdefault((s.family, s.dataset), s)
    out = []
    for (family, dataset), spec in sorted(firsts.items()):
        t0 = time.perf_counter()
        curve = loss_curve(spec, settings, args.epochs)
        out.append({"family": family, "dataset": dataset, "lr": spec.lr, "batch_size": spec.batch_size,
                    "plateau_epoch": plateau_epoch(curve, args.tol), "loss": [round(v, 4) for v in curve],
                    "s_per_epoch": round((time.perf_counter() - t0) / args.epochs, 2)})
        print(f"{family}/{dataset}: plateau at epoch {out[-1]['plateau_epoch']} of {args.epochs}", file=sys.stderr, flush=True)
    print(json.dumps({"bench": "theta0_plateau", "config": args.config, "epochs": args.epochs, "tol": args.tol, "specs": out}))


if __name__ == "__main__":
    main()
