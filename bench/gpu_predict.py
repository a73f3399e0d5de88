"""KNOW prediction speed on CUDA: one step of the shipped KNOWN over 11.2M scalars (ResNet18-sized) with the Triton
kernel (known/gpu.py) and with the torch layout (known/fast.py), each ÷ an n×n fp32 matmul of the same FLOPs timed
in the same run (TF32 off, torch's default), and each one's max error against KNOWN.step in float64 on 100k rows.

Needs only torch, Triton and safetensors (it runs on a bare GPU image: neither it nor bench/common.py's timing
and output import the project's collectors, MLflow or Ray). Target: ratio <= 2.0, as bench/predict_speed.py on the CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import KNOWN_MACS, best_of, emit
from safetensors.torch import load_file

from known.fast import FastKNOWN
from known.gpu import TritonKNOWN
from known.model import KNOWN, segment_rms

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=int, default=11_200_000, help="scalars per step (ResNet18: 11.2M)")
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = KNOWN(inputs="rms")
    model.load_state_dict(load_file(str(Path(__file__).resolve().parents[1] / "known/weights/conv.safetensors")))
    model = model.eval().to(dev)
    w = torch.randn(args.params, 5, device=dev) * 0.05
    rms = segment_rms(w[:, -1], [args.params])
    flops = 2 * KNOWN_MACS * args.params
    n = round((flops / 2) ** (1 / 3))
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    t_mm = best_of(lambda: a @ b, sync=torch.cuda.synchronize)
    layouts = {"triton": TritonKNOWN(model).to(dev), "torch_layout": FastKNOWN(model).to(dev)}
    with torch.no_grad():
        want = model.double().step(w[:100_000].double(), rms[:100_000].double()).float()
    model.float()
    out = {}
    for name, layout in layouts.items():
        chunk = getattr(layout, "CUDA_CHUNK", layout.CHUNK)  # as known.predict.default_chunk (not imported: it needs the collectors)
        t = best_of(lambda: layout.step(w, rms, chunk, 1), sync=torch.cuda.synchronize)
        err = (layout.step(w[:100_000], rms[:100_000], chunk, 1) - want).abs().max().item()
        out[name] = {"step_s": round(t, 4), "ratio": None, "max_err_vs_float64": err}
    t_mm = min(t_mm, best_of(lambda: a @ b, sync=torch.cuda.synchronize))  # the matmul again, after: the faster of the two
    for v in out.values():
        v["ratio"] = round(v["step_s"] / t_mm, 3)
    emit("gpu_predict", ratio=out["triton"]["ratio"], target="<= 2.0", layouts=out, matmul_s=round(t_mm, 4),
         matmul_tflops=round(2 * n**3 / t_mm / 1e12, 1), params=args.params, gpu=torch.cuda.get_device_name(0))

if __name__ == "__main__":
    main()
