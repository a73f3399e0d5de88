"""Prediction speed: one KNOW step (KNOWN on every scalar) vs a plain matmul of the same FLOP count.

The paper's anchor is ResNet18 (11.2M parameters); KNOWN costs 8,832 multiply-adds per scalar, so one step
is ~2e11 FLOPs. Both are timed in this process (best of 3 after a warm-up) on the same threads; the figure
is the ratio (target <= 2.0). ``--params`` scales the problem down for a quick look.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import emit

from known import registry
from known.predict import DEFAULT_CHUNK, _step

MACS_PER_SCALAR = 8832


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=int, default=11_200_000, help="scalars per step (ResNet18: 11.2M)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    args = p.parse_args()
    torch.manual_seed(0)
    model = registry.load()["conv"]  # the shipped KNOWN, in its input mode
    window = torch.randn(args.params, 5) * 0.05
    flops = 2 * MACS_PER_SCALAR * args.params
    n = round((flops / 2) ** (1 / 3))  # an n×n @ n×n matmul of the same FLOPs
    a, b = torch.randn(n, n), torch.randn(n, n)
    t_known = best_of(lambda: _step(window, "known", model, args.chunk, [args.params]))
    t_mm = best_of(lambda: a @ b)
    emit("predict_speed", ratio=round(t_known / t_mm, 3), target="<= 2.0", known_step_s=round(t_known, 3),
         matmul_s=round(t_mm, 3), matmul_n=n, params=args.params, flops=flops,
         s_per_param=t_known / args.params, known_gflops=round(flops / t_known / 1e9, 1),
         matmul_gflops=round(2 * n**3 / t_mm / 1e9, 1), chunk=args.chunk, inputs=model.inputs)


if __name__ == "__main__":
    main()
