"""Prediction speed: one KNOW step (KNOWN on every scalar) vs a plain matmul of the same FLOP count.

The paper's anchor is ResNet18 (11.2M parameters); KNOWN costs 8,832 multiply-adds per scalar, so one step
is ~2e11 FLOPs. Both are timed in this process (best of 3 after a warm-up), the matmul on torch's default
threads and the step as ``known.predict`` runs it (``--threads`` chunk threads, default the same count); the
figure is the ratio (target <= 2.0). On the CPU the step runs the native kernel (known/native.py, built before
timing); ``--torch-layout`` also times the torch layout it falls back to (known/fast.py), ``--unfused`` the plain
``KNOWN.step`` in chunks (the layout before both). ``--params`` scales the problem down for a quick look;
``--device cuda`` runs both on the GPU.
"""

from __future__ import annotations

import argparse

import torch
from common import KNOWN_MACS, best_of, emit

from known import registry
from known.fast import FastKNOWN
from known.model import segment_rms
from known.predict import _step, default_chunk
from known.predict import layout as choose_layout

def unfused(model, window: torch.Tensor, chunk: int) -> torch.Tensor:
    """``KNOWN.step`` chunk by chunk on torch's threads: the step before known/fast.py."""
    rms = segment_rms(window[:, -1], [len(window)])
    out = torch.empty(len(window), device=window.device)
    with torch.inference_mode():
        for i in range(0, len(window), chunk):
            out[i : i + chunk] = model.step(window[i : i + chunk], rms[i : i + chunk])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=int, default=11_200_000, help="scalars per step (ResNet18: 11.2M)")
    p.add_argument("--chunk", type=int, default=None, help="scalars per forward pass (default: each layout's own)")
    p.add_argument("--threads", type=int, default=None, help="chunk threads (default: torch's intra-op threads)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--unfused", action="store_true", help="also time KNOWN.step in chunks (the old layout)")
    p.add_argument("--torch-layout", action="store_true", help="also time the torch layout (known/fast.py)")
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = registry.load_predictor()["conv"].to(dev)  # the shipped KNOWN, in its input mode
    window = torch.randn(args.params, 5, device=dev) * 0.05
    flops = 2 * KNOWN_MACS * args.params
    n = round((flops / 2) ** (1 / 3))  # an n×n @ n×n matmul of the same FLOPs
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    t_mm = best_of(lambda: a @ b, sync=sync)
    layout = choose_layout(window, model)  # the layout _step runs
    t_known = best_of(lambda: _step(window, "known", model, args.chunk, [args.params], args.threads), sync=sync)
    others = {}  # further layouts, each timed in this run
    if args.unfused:
        others["unfused"] = best_of(lambda: unfused(model, window, args.chunk or default_chunk(FastKNOWN, window)), sync=sync)
    if args.torch_layout:
        fast, rms = FastKNOWN(model).to(dev), segment_rms(window[:, -1], [args.params])
        threads = args.threads or (1 if dev.type == "cuda" else torch.get_num_threads())
        others["torch_layout"] = best_of(lambda: fast.step(window, rms, args.chunk or default_chunk(FastKNOWN, window), threads),
                                         sync=sync)
    t_mm = min(t_mm, best_of(lambda: a @ b, sync=sync))  # the matmul again, after: the faster of the two
    extra = {}
    for name, t in others.items():
        extra[f"{name}_step_s"], extra[f"{name}_ratio"] = round(t, 3), round(t / t_mm, 3)
    emit("predict_speed", ratio=round(t_known / t_mm, 3), target="<= 2.0", known_step_s=round(t_known, 3),
         matmul_s=round(t_mm, 3), matmul_n=n, params=args.params, flops=flops,
         s_per_param=t_known / args.params, known_gflops=round(flops / t_known / 1e9, 1),
         matmul_gflops=round(2 * n**3 / t_mm / 1e9, 1), layout=layout.__name__, chunk=args.chunk or default_chunk(layout, window),
         inputs=model.inputs, device=str(dev),
         threads=args.threads or (1 if dev.type == "cuda" else torch.get_num_threads()), **extra)


if __name__ == "__main__":
    main()
