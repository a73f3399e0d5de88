"""KNOWN's forward pass as one Triton kernel for CUDA: the GPU counterpart of known/native.cpp.

Why: on an H100 the torch layout (known/fast.py) took 12.5x a same-FLOP fp32 matmul for a ResNet18-sized KNOW
step: every layer is a kernel launch over [64, rows] activations in GPU memory. Here each program takes a block of
64 rows through the whole network in registers, in the CPU kernel's parameter layout (``NativeKNOWN.pack``: the
squeeze layer folded into the input layer): 1.65x (docs/benchmarks.md). The dots run as "tf32x3": three TF32 tensor-core
passes that keep fp32 accuracy (measured on the H100: max error against float64 1.7e-5, the torch fp32 layout's
7e-5); plain IEEE fp32 dots were 6x slower, one TF32 pass would lose 3 digits. Imported only where a CUDA tensor is
predicted; without Triton the torch layout runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from known.fast import NativeKNOWN, run_chunks
from known.model import EXP_CEIL, EXP_FLOOR, LEAKY_SLOPE, KNOWN

S, H, Q, O = 5, 64, 8, 32
STREAM = H * S + H + Q * S + Q + 3 * (H * Q + H) + O * H + O  # one stream's share of the packed vector
PACKED = 2 * STREAM + 2 * O + 1  # both streams and the head: the length the kernel reads


@triton.jit
def _weights(p, rows: tl.constexpr, cols: tl.constexpr, ld: tl.constexpr, rows_pad: tl.constexpr, cols_pad: tl.constexpr):
    """W^T [cols_pad, rows_pad] of a row-major [rows, cols] matrix at p, zero-padded (tl.dot needs sides >= 16)."""
    r = tl.arange(0, rows_pad)[None, :]
    c = tl.arange(0, cols_pad)[:, None]
    return tl.load(p + r * ld + c, mask=(r < rows) & (c < cols), other=0.0)


@triton.jit
def _vector(p, n: tl.constexpr, n_pad: tl.constexpr):
    i = tl.arange(0, n_pad)
    return tl.load(p + i, mask=i < n, other=0.0)


@triton.jit
def _stream(p, head, x, floor, ceil, slope, PREC: tl.constexpr):
    """One stream's contribution to the head's pre-activation for the rows of x [BM, 16] (inputs zero-padded)."""
    w_in, b_in = p, p + 64 * 5
    w_sq, b_sq = b_in + 64, b_in + 64 + 8 * 5
    w_base, b_base = b_sq + 8, b_sq + 8 + 64 * 8
    w_gate, b_gate = b_base + 64, b_base + 64 + 64 * 8
    w_rate, b_rate = b_gate + 64, b_gate + 64 + 64 * 8
    w_out, b_out = b_rate + 64, b_rate + 64 + 32 * 64
    h = tl.dot(x, _weights(w_in, 64, 5, 5, 64, 16), input_precision=PREC) + _vector(b_in, 64, 64)[None, :]
    g = tl.dot(x, _weights(w_sq, 8, 5, 5, 16, 16), input_precision=PREC) + _vector(b_sq, 8, 16)[None, :]
    g = tl.maximum(g, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch
    base = tl.dot(g, _weights(w_base, 64, 8, 8, 64, 16), input_precision=PREC) + _vector(b_base, 64, 64)[None, :]
    gate = tl.dot(g, _weights(w_gate, 64, 8, 8, 64, 16), input_precision=PREC) + _vector(b_gate, 64, 64)[None, :]
    rate = tl.dot(g, _weights(w_rate, 64, 8, 8, 64, 16), input_precision=PREC) + _vector(b_rate, 64, 64)[None, :]
    rh = tl.minimum(tl.maximum(rate * h, floor, propagate_nan=tl.PropagateNan.ALL), ceil, propagate_nan=tl.PropagateNan.ALL)
    e = base + gate * tl.exp(rh)
    o = tl.dot(e, _weights(w_out, 32, 64, 64, 32, 64), input_precision=PREC) + _vector(b_out, 32, 32)[None, :]
    o = tl.where(o > 0, o, o * slope)
    return tl.sum(o * _vector(head, 32, 32)[None, :], axis=1)


@triton.jit
def _forward(w_ptr, x_ptr, out_ptr, n, floor, ceil, slope, STREAM_SIZE: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    # (not "params": Triton 3.6's launcher binds a dict of that name before reading the arguments)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, 16)
    x = tl.load(x_ptr + rows[:, None] * 5 + cols[None, :], mask=(rows[:, None] < n) & (cols[None, :] < 5), other=0.0)
    head = w_ptr + 2 * STREAM_SIZE
    z = _stream(w_ptr, head, x, floor, ceil, slope, PREC) + _stream(w_ptr + STREAM_SIZE, head + 32, x, floor, ceil, slope, PREC)
    z = z + tl.load(head + 64)
    y = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)  # tanh: ±1 where exp over/underflows, NaN stays NaN
    tl.store(out_ptr + rows, y, mask=rows < n)


def check_size(params: torch.Tensor) -> torch.Tensor:
    """``params`` if it has the length the kernel's offsets read (``PACKED``; its layout and ``NativeKNOWN.pack``
    agree), else ValueError: a mismatch would read other weights silently, not fail."""
    if len(params) != PACKED:
        raise ValueError(f"the Triton kernel reads {PACKED} parameters, this KNOWN packs {len(params)}")
    return params


def forward(params: torch.Tensor, x: torch.Tensor, block: int = 64, precision: str = "tf32x3") -> torch.Tensor:
    """KNOWN's output for network inputs ``x`` [n, S] on the GPU, parameters packed by ``NativeKNOWN.pack``; [n]."""
    x = x.float().contiguous()
    out = torch.empty(len(x), dtype=torch.float32, device=x.device)
    _forward[(triton.cdiv(len(x), block),)](params, x, out, len(x), EXP_FLOOR, EXP_CEIL, LEAKY_SLOPE, STREAM, block, precision)
    return out


class TritonKNOWN:
    """``KNOWN.step`` over many rows through the Triton kernel (CUDA, float32)."""

    CHUNK = 1 << 22  # one launch per 4M rows: the GPU wants large launches, memory stays ~100 MB per chunk

    def __init__(self, model: KNOWN):
        if model.n_stages != S:
            raise ValueError(f"the Triton kernel is built for {S} stages, this KNOWN reads {model.n_stages}")
        self.params, self.prepare = check_size(NativeKNOWN.pack(model)), model.prepare

    def to(self, device) -> TritonKNOWN:
        self.params = self.params.to(device)
        return self

    def step(self, w: torch.Tensor, rms: torch.Tensor | None, chunk: int, threads: int = 1) -> torch.Tensor:
        """``KNOWN.step`` of every row of ``w`` [N, S] in chunks of ``chunk`` rows (``threads``: ignored, one stream)."""
        return run_chunks(self.prepare, lambda: lambda x: forward(self.params, x), w, rms, chunk, 1)
