"""Real-data sweeps: wall time, bytes and the per-stage test accuracy of a small CNN on MNIST and CIFAR-10.

Θ0: 5 epochs on the full training set (60k / 50k images); then 6 stages, r=0.5, 3 epochs each. Writes a
forgetting-curve plot next to the JSON line (``--plot PATH``). CIFAR-10 from a rebuilt local copy needs
``--unverified-cifar10``; accuracies on that copy are close to, not equal to, the official set's.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import cnn_spec, emit, settings

from collectors.sweep import run_sweep, to_record
from meta.shards import ShardWriter, encode_sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--unverified-cifar10", action="store_true")
    p.add_argument("--plot", default="bench/forgetting_curve.png")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    curves = {}
    for dataset in ("mnist", "cifar10"):
        spec = cnn_spec(dataset, train_size=None, pretrain_epochs=5, stage_epochs=3)
        t0 = time.perf_counter()
        res = run_sweep(spec, settings(args.unverified_cifar10))
        with tempfile.TemporaryDirectory() as d, ShardWriter(d, "real") as w:
            w.write(encode_sample(to_record(res), res.tensors))
        wall = time.perf_counter() - t0
        accs = [round(m.test_acc, 4) for m in res.stages]
        curves[dataset] = (res, accs)
        emit("real_sweep", dataset=dataset, wall_s=round(wall, 1), sweep_bytes=w.published[0].bytes,
             n_params=res.n_params, stage_size=[m.subset_size for m in res.stages], stage_test_acc=accs,
             stage_train_acc=[round(m.train_acc, 4) for m in res.stages],
             stage_wall_s=[round(m.wall_s, 1) for m in res.stages], threads=args.threads, spec=spec.model_dump(mode="json"))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for dataset, (res, accs) in curves.items():
            ax.plot(range(len(accs)), accs, marker="o", label=f"{dataset} (|D0|={res.stages[0].subset_size})")
        ax.set_xlabel("stage k (|D_k| = 0.5^k |D0|)")
        ax.set_ylabel("test accuracy")
        ax.set_title("Controlled forgetting: small CNN, 3 epochs per stage")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
