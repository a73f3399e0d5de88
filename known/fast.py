"""KNOWN's forward pass laid out for inference over millions of scalars (a KNOW step): two layouts, one
function (the same as ``KNOWN.forward``), measured on the 2-core VM (docs/benchmarks.md).

``NativeKNOWN`` runs the fused C++ kernel (known/native.py) on the CPU wherever it builds: each block of rows goes
through the whole network in SIMD registers, the squeeze layer folded into the input layer.

``FastKNOWN`` is the torch layout, for CUDA and for machines without a C++ compiler:
- activations are transposed, [features, rows]: each stream's block and the base / gate / rate blocks are
  contiguous row slices, so every matmul writes straight into its slice and no elementwise op runs on a strided view;
- biases are folded into the matmuls through a row of ones, instead of a broadcast copy before each of them;
- the two input layers are one (the differences stream reads D·x, D the difference matrix), and base, gate and
  rate are one matmul per stream;
- buffers are allocated once per chunk size and reused (a fresh 1 MB activation per op costs page faults).

Both run chunks on ``threads`` Python threads with one intra-op thread each: small ops split across OpenMP
threads wait on each other, badly so when another process shares the cores (measured 20-90x slower).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from known import native
from known.model import EXP_CEIL, EXP_FLOOR, LEAKY_SLOPE, KNOWN

H = 64  # hidden width of each stream


def differences(n: int) -> torch.Tensor:
    """D [n-1, n] with D·x = the n-1 successive differences of x (the differences stream's input)."""
    d = torch.zeros(n - 1, n)
    d[range(n - 1), range(1, n)], d[range(n - 1), range(n - 1)] = 1.0, -1.0
    return d


def _with_bias(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[out, in + 1]: the bias as the last input column (read against a row of ones)."""
    return torch.cat([weight, bias[:, None]], 1)


def _epilogue(rate: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """base + gate * exp(clamp(rate * h)) into ``out`` (see ``Stream.forward`` for the clamp)."""
    return torch.mul(rate, h, out=out).clamp_(EXP_FLOOR, EXP_CEIL).exp_().mul_(gate).add_(base)


class FastKNOWN:
    """An inference-only copy of a KNOWN's weights in the layout above; ``step`` is ``KNOWN.step`` over many rows."""

    CHUNK = 2048  # its default chunk on the CPU: keeps the [192, chunk] activations in L2 (bench/predict_speed.py)
    CUDA_CHUNK = 1 << 22  # on CUDA: few large launches (2,048-row chunks took 1.8 s for 11.2M rows on an H100, 4M 0.055 s)

    def __init__(self, model: KNOWN):
        v, d = model.values, model.diffs
        n, diff = model.n_stages, differences(model.n_stages).to(d.inp.weight.device)
        with torch.no_grad():
            w_in = torch.zeros(2 * H + 1, n + 1)  # rows: values block, a row of ones, differences block
            w_in[:H] = _with_bias(v.inp.weight, v.inp.bias)
            w_in[H, n] = 1.0
            w_in[H + 1 :] = _with_bias(d.inp.weight @ diff, d.inp.bias)
            # the values stream reads rows [0, H] (block, then ones), the differences stream rows [H, 2H] (ones first)
            self.squeeze = [_with_bias(v.squeeze.weight, v.squeeze.bias),
                            torch.cat([d.squeeze.bias[:, None], d.squeeze.weight], 1)]
            self.bgr = [_with_bias(torch.cat([s.base.weight, s.gate.weight, s.rate.weight]),
                                   torch.cat([s.base.bias, s.gate.bias, s.rate.bias])) for s in (v, d)]
            self.out = [_with_bias(s.out.weight, s.out.bias) for s in (v, d)]
            self.head = _with_bias(model.head.weight, model.head.bias)
        self.w_in, self.n_stages = w_in, n
        self.prepare = model.prepare

    def to(self, device) -> FastKNOWN:
        for name in ("w_in", "head"):
            setattr(self, name, getattr(self, name).to(device))
        for name in ("squeeze", "bgr", "out"):
            setattr(self, name, [t.to(device) for t in getattr(self, name)])
        return self

    def _buffers(self, n: int, device) -> dict[str, torch.Tensor]:
        def ones(rows):
            return torch.ones(rows, n, device=device)

        return {"x": ones(self.n_stages + 1), "h": ones(2 * H + 1), "g": ones(9), "bgr": ones(3 * H), "e": ones(H + 1),
                "o": ones(2 * 32 + 1), "r": ones(1)}

    def residual(self, x: torch.Tensor, buf: dict[str, torch.Tensor]) -> torch.Tensor:
        """KNOWN's output for network inputs ``x`` [n, S], computed in ``buf`` (from ``_buffers(n)``); [n]."""
        s = self.n_stages
        buf["x"][:s].copy_(x.T)
        h = torch.mm(self.w_in, buf["x"], out=buf["h"])
        for j, (rows, block) in enumerate(((slice(0, H + 1), slice(0, H)), (slice(H, 2 * H + 1), slice(H + 1, 2 * H + 1)))):
            torch.mm(self.squeeze[j], h[rows], out=buf["g"][:8]).relu_()
            bgr = torch.mm(self.bgr[j], buf["g"], out=buf["bgr"])
            _epilogue(bgr[2 * H :], h[block], bgr[H : 2 * H], bgr[:H], buf["e"][:H])
            torch.mm(self.out[j], buf["e"], out=buf["o"][32 * j : 32 * (j + 1)])
        F.leaky_relu_(buf["o"][:64], LEAKY_SLOPE)
        return torch.mm(self.head, buf["o"], out=buf["r"]).tanh_()[0]

    def step(self, w: torch.Tensor, rms: torch.Tensor | None, chunk: int, threads: int = 1) -> torch.Tensor:
        """``KNOWN.step`` of every row of ``w`` [N, S], in chunks of ``chunk`` rows on ``threads`` threads."""
        def per_thread():
            bufs: dict[int, dict] = {}
            return lambda x: self.residual(x, bufs.setdefault(len(x), self._buffers(len(x), w.device)))

        return run_chunks(self.prepare, per_thread, w, rms, chunk, threads)


def run_chunks(prepare, per_thread, w: torch.Tensor, rms: torch.Tensor | None, chunk: int, threads: int) -> torch.Tensor:
    """``KNOWN.step`` of every row of ``w`` [N, S]: ``threads`` Python threads, each on its share of the rows in
    chunks of ``chunk``, with the residual function ``per_thread()`` gives it (network inputs -> output)."""
    out = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
    threads = max(1, threads)
    edges = [w.shape[0] * k // threads for k in range(threads + 1)]

    def run(lo: int, hi: int) -> None:
        _predict(prepare, per_thread(), w, rms, out, lo, hi, chunk)

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # each Python thread runs its chunks on one core (on CUDA: launches kernels)
    try:
        if threads == 1:
            run(0, w.shape[0])
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, edges[:-1], edges[1:]))
    finally:
        torch.set_num_threads(saved)
    return out


def _predict(prepare, residual, w: torch.Tensor, rms: torch.Tensor | None, out: torch.Tensor, lo: int, hi: int,
             chunk: int) -> None:
    """out[lo:hi] = ``KNOWN.step`` of those rows of ``w``, ``residual`` (network inputs -> output) on chunks of
    ``chunk`` rows."""
    with torch.inference_mode():
        for i in range(lo, hi, chunk):
            j = min(i + chunk, hi)
            x, centre, scale = prepare(w[i:j], None if rms is None else rms[i:j])
            out[i:j] = centre + scale * residual(x)


class NativeKNOWN:
    """``KNOWN.step`` over many rows through the native kernel (known/native.py: CPU, float32, where it builds)."""

    CHUNK = 16384  # its default chunk: the kernel streams through rows, a larger chunk amortises prepare's torch ops

    def __init__(self, model: KNOWN):
        if model.n_stages != native.S:
            raise ValueError(f"the native kernel is built for {native.S} stages, this KNOWN reads {model.n_stages}")
        self.params, self.prepare = native.check_size(self.pack(model), unfolded=False), model.prepare

    @staticmethod
    def pack(model: KNOWN) -> torch.Tensor:
        """The kernel's float32 parameter vector (layout at the top of known/native.cpp): both streams read the
        network input, the differences stream through D, and the squeeze layer is folded into the input layer."""
        n, parts = model.n_stages, []
        with torch.no_grad():
            for s, reads in ((model.values, torch.eye(n)), (model.diffs, differences(n))):
                w = {k: getattr(s, k).weight.detach().float().cpu() for k in ("inp", "squeeze", "base", "gate", "rate", "out")}
                b = {k: getattr(s, k).bias.detach().float().cpu() for k in w}
                w_in = w["inp"] @ reads
                parts += [w_in, b["inp"], w["squeeze"] @ w_in, w["squeeze"] @ b["inp"] + b["squeeze"]]
                parts += [t for k in ("base", "gate", "rate", "out") for t in (w[k], b[k])]
            parts += [model.head.weight.detach().float().cpu(), model.head.bias.detach().float().cpu()]
        return torch.cat([p.reshape(-1) for p in parts]).contiguous()

    def to(self, device) -> NativeKNOWN:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the native KNOWN kernel runs on the CPU, not on {device}")
        return self

    def step(self, w: torch.Tensor, rms: torch.Tensor | None, chunk: int, threads: int = 1) -> torch.Tensor:
        """``KNOWN.step`` of every row of ``w`` [N, S], in chunks of ``chunk`` rows on ``threads`` threads."""
        return run_chunks(self.prepare, lambda: lambda x: native.forward(self.params, x.float()), w, rms, chunk, threads)
