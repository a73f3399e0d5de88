"""KNOWN's forward pass laid out for inference over millions of scalars (a KNOW step), on CPU or CUDA.

Same function as ``KNOWN.forward``, computed differently (measured on the 2-core VM, README):
- activations are transposed, [features, rows]: each stream's block and the base / gate / rate blocks are
  contiguous row slices, so every matmul writes straight into its slice and no elementwise op runs on a strided view;
- biases are folded into the matmuls through a row of ones, instead of a broadcast copy before each of them;
- the two input layers are one (the differences stream reads D·x, D the difference matrix), and base, gate and
  rate are one matmul per stream;
- buffers are allocated once per chunk size and reused (a fresh 1 MB activation per op costs page faults);
- chunks run on ``threads`` Python threads with one intra-op thread each: small ops split across OpenMP
  threads wait on each other, badly so when another process shares the cores (measured 20-90x slower).

``CompiledKNOWN`` is the same function once more, for torch.compile: the squeeze layer folded into the input
layer (no nonlinearity between them), so that every layer before ``out`` reads at most 8 inputs, written as
broadcast sums, which inductor unrolls into one vectorised loop per stream (a GEMM with K <= 9 runs far below
peak). Faster on CPU once compiled, but compiling takes seconds: opt-in (``compile=True``).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from known.model import EXP_CEIL, EXP_FLOOR, LEAKY_SLOPE, KNOWN

log = logging.getLogger(__name__)
H = 64  # hidden width of each stream


def _differences(n: int) -> torch.Tensor:
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

    CHUNK = 2048  # its default chunk: keeps the [192, chunk] activations in L2 (bench/predict_speed.py)

    def __init__(self, model: KNOWN):
        v, d = model.values, model.diffs
        n, diff = model.n_stages, _differences(model.n_stages).to(d.inp.weight.device)
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
        out = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
        threads = max(1, threads)
        edges = [w.shape[0] * k // threads for k in range(threads + 1)]

        def run(lo: int, hi: int) -> None:
            bufs: dict[int, dict] = {}
            _predict(self.prepare, lambda x: self.residual(x, bufs.setdefault(len(x), self._buffers(len(x), w.device))),
                     w, rms, out, lo, hi, chunk)

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
    ``chunk`` rows: the loop both layouts share."""
    with torch.inference_mode():
        for i in range(lo, hi, chunk):
            j = min(i + chunk, hi)
            x, centre, scale = prepare(w[i:j], None if rms is None else rms[i:j])
            out[i:j] = centre + scale * residual(x)


def _linear(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w @ x + b for x [K, rows] as a broadcast sum: inductor unrolls sums of K <= 8 into the consumer's loop."""
    return (w[:, :, None] * x[None]).sum(1) + b[:, None]


def _residual(xt: torch.Tensor, streams: list[dict], head: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """KNOWN's output for network inputs ``xt`` [S, rows] (transposed), weights from ``CompiledKNOWN``; [rows]."""
    outs = []
    for p in streams:
        h = _linear(*p["in"], xt)
        g = torch.relu(_linear(*p["squeeze"], xt))
        rate = (_linear(*p["rate"], g) * h).clamp(EXP_FLOOR, EXP_CEIL)
        e = _linear(*p["base"], g) + _linear(*p["gate"], g) * torch.exp(rate)
        outs.append(F.leaky_relu(torch.addmm(p["out"][1][:, None], p["out"][0], e), LEAKY_SLOPE))
    return torch.tanh(torch.addmm(head[1][:, None], head[0], torch.cat(outs)))[0]


# the weights are arguments, so one compiled graph serves every KNOWN (a graph per chunk size and device)
_compiled_residual = torch.compile(_residual, dynamic=False)
_compile_failed = False  # set once compiling failed in this process: not retried for every step and kind


class CompiledKNOWN:
    """``KNOWN.step`` as one torch.compile'd graph per chunk size (see the module docstring); falls back to
    ``FastKNOWN`` where compiling fails (no C++ compiler, unsupported backend)."""

    CHUNK = 4096  # its default chunk: one graph call per chunk, so larger than FastKNOWN's (bench/predict_speed.py)

    def __init__(self, model: KNOWN):
        n = model.n_stages
        dev = model.head.weight.device
        self.streams = [self._stream(model.values, torch.eye(n, device=dev)), self._stream(model.diffs, _differences(n).to(dev))]
        self.head = (model.head.weight.detach().clone(), model.head.bias.detach().clone())
        self.prepare, self.model = model.prepare, model

    @staticmethod
    def _stream(s, reads: torch.Tensor) -> dict[str, torch.Tensor]:
        """One stream's weights against the network input x (``reads``: the stream's input is reads @ x)."""
        w = {k: getattr(s, k).weight.detach() for k in ("inp", "squeeze", "base", "gate", "rate", "out")}
        b = {k: getattr(s, k).bias.detach() for k in w}
        w_in = w["inp"] @ reads
        return {"in": (w_in, b["inp"]), "squeeze": (w["squeeze"] @ w_in, w["squeeze"] @ b["inp"] + b["squeeze"]),
                **{k: (w[k].clone(), b[k].clone()) for k in ("base", "gate", "rate", "out")}}

    def to(self, device) -> CompiledKNOWN:
        self.streams = [{k: tuple(t.to(device) for t in v) for k, v in p.items()} for p in self.streams]
        self.head = tuple(t.to(device) for t in self.head)
        return self

    def step(self, w: torch.Tensor, rms: torch.Tensor | None, chunk: int, threads: int = 1) -> torch.Tensor:
        """``KNOWN.step`` of every row of ``w`` [N, S] in chunks of ``chunk`` rows (the last one padded, so one
        graph serves every chunk) on torch's threads (inductor's loops are OpenMP-parallel; Python threads
        would queue on the GIL). Where compiling fails (only the compile: any later error is raised), this and
        every later call of the process run ``FastKNOWN`` on ``threads`` threads instead."""
        global _compile_failed
        if not _compile_failed:
            try:
                self._compile(chunk, w.shape[1], w.device)
            except Exception as e:  # noqa: BLE001 - any compiler or backend failure means: the eager layout
                _compile_failed = True
                log.warning("torch.compile of the KNOW step failed (%s): running it eagerly", str(e).splitlines()[0])
        if _compile_failed:
            return FastKNOWN(self.model).to(w.device).step(w, rms, chunk, threads)
        return self._run(w, rms, chunk)

    def _compile(self, chunk: int, s: int, device) -> None:
        """Compiles (or finds compiled) the graph for this chunk size, on zeros of the weights' dtype."""
        with torch.inference_mode():
            _compiled_residual(torch.zeros(s, chunk, dtype=self.head[0].dtype, device=device), self.streams, self.head)

    def _run(self, w: torch.Tensor, rms: torch.Tensor | None, chunk: int) -> torch.Tensor:
        out = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
        pad = torch.zeros(chunk, w.shape[1], dtype=w.dtype, device=w.device)

        def residual(x: torch.Tensor) -> torch.Tensor:
            full = torch.cat([x, pad[: chunk - len(x)]]) if len(x) < chunk else x
            return _compiled_residual(full.T.contiguous(), self.streams, self.head)[: len(x)]

        _predict(self.prepare, residual, w, rms, out, 0, w.shape[0], chunk)
        return out
