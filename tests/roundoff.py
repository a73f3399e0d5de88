"""How far a float32 KNOW step may be from the exact one: a tolerance from float32 and the computation's size.

A fixed tolerance such as ``atol=1e-5, rtol=1e-4`` against a float64 reference holds on one CPU and fails on
another: BLAS and oneDNN pick other kernels (summation order, FMA, vector width) per CPU, and how far their
float32 roundings carry depends on the network (the exponent stage amplifies them). ``step_error_bound`` states
what any float32 evaluation of ``KNOWN.step`` may lose, row by row, whatever the order of its sums:

- every operation's rounding error is at most γ_n · (the sum of the |terms| it adds), n terms, γ_n = n·u/(1 − n·u),
  u = 2^-24 float32's unit roundoff (Higham, Accuracy and Stability of Numerical Algorithms, §3.1): a matmul
  of an ``in``-wide layer adds in + 1 terms (its bias); folded layers (the torch layout's D·x, the kernels'
  squeeze-into-input) count the folded matrix's terms too; exp is taken to lose 4u of its value (about 1 ulp in
  torch, the native kernel and Triton), tanh 16u absolute (1 − 2/(e^2z + 1) loses up to ~11u near ±1);
- the step's error is, to first order in u, the sum over operations of |∂step/∂(that result)| times that rounding
  error: the derivatives come from autograd through a float64 copy of ``KNOWN.forward`` (``model.py``).

The bound is large only on ill-conditioned rows (large exponents, cancelling sums) and tiny elsewhere (median ~4e-8
against a median residual of ~3e-2 on the tests' trained-like weights), so a layout that computes another function
still fails: a dropped bias, swapped gate and rate weights, the differences stream reading x instead of D·x, rms
one row off each put 165-3000 of 3001 rows beyond it (the former atol=1e-5, rtol=1e-4: 111-2999). Measured on an
AMD EPYC (AVX2): the torch layout, the native kernel and the Triton interpreter stay within 0.17 of the bound under
every oneDNN and MKL ISA limit; with MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default the former tolerance
failed (1.1 of it), the bound was not approached (0.004 of it).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from known.model import EXP_CEIL, EXP_FLOOR, LEAKY_SLOPE, TINY, KNOWN, segment_rms

U = torch.finfo(torch.float32).eps / 2  # float32's unit roundoff, 2^-24
EXP_ROUNDOFF, TANH_ROUNDOFF = 4 * U, 16 * U
MARGIN = 2.0  # the bound is first order in u; the factor covers the O(n²u²) terms


def gamma(n):
    """Higham's γ_n: the relative error bound of a sum of n terms in float32, in any order."""
    return n * U / (1 - n * U)


def step_error_bound(model: KNOWN, w: torch.Tensor, rms: torch.Tensor | None = None,
                     sizes: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``model.step(w, rms)`` computed in float64, a per-row bound on its float32 evaluation's error).

    ``rms``: each row's tensor RMS as the float32 step gets it (exact); or ``sizes``: the step computes it in
    float32 with ``segment_rms`` over tensors of these sizes, and its rounding counts too.
    """
    m = copy.deepcopy(model).double().requires_grad_(False)  # derivatives by the activations only
    w = w.detach().double()
    taps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def rounded(value: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        """``value`` as float32 computes it, up to ``err``: a zero to differentiate the step against."""
        z = torch.zeros_like(value, requires_grad=True)
        taps.append((z, err.detach().expand_as(value)))
        return value + z

    def linear(layer, h, mag, folded=0):
        """layer(h); ``mag``: the |terms| that led to h in its linear chain, ``folded``: the terms folded into it."""
        out_mag = mag @ layer.weight.abs().T + layer.bias.abs()
        n = layer.in_features + 1 + folded
        return rounded(F.linear(h, layer.weight, layer.bias), gamma(n) * out_mag), out_mag, n

    centre = w[:, -1]
    if m.inputs == "raw":
        x, scale = w, torch.ones_like(centre)
    elif m.inputs == "scaled":
        path = (w[:, 1:] - w[:, :-1]).abs().sum(1) + TINY
        scale = rounded(path, gamma(w.shape[1] + 1) * path)
        x = rounded(w - centre[:, None], U * (w - centre[:, None]).abs()) / scale[:, None]
        x = rounded(x, U * x.abs())
    else:
        if rms is None:
            if sizes is None:
                raise ValueError("an rms KNOWN needs rms or sizes")
            rms = segment_rms(centre, sizes)
            n = torch.repeat_interleave(torch.as_tensor(list(sizes)), torch.as_tensor(list(sizes))).double()
            rms = rounded(rms, (gamma(n + 2) / 2 + U) * rms)  # a sum of n squares, a division, a square root
        scale = rms.double() + TINY
        scale = rounded(scale, U * scale)
        x = w / scale[:, None]
        x = rounded(x, U * x.abs())

    streams = []
    for stream, differences in ((m.values, False), (m.diffs, True)):
        if differences:  # D·x, or D folded into the input layer: |D|·|x| either way
            inp, mag, folded = x[:, 1:] - x[:, :-1], x[:, 1:].abs() + x[:, :-1].abs(), 2
            inp = rounded(inp, U * mag)
        else:
            inp, mag, folded = x, x.abs(), 0
        h, mag_h, n_h = linear(stream.inp, inp, mag, folded)
        g, _, _ = linear(stream.squeeze, h, mag_h, folded + n_h)  # the kernels fold squeeze into the input layer
        g = F.relu(g)
        base, gate, rate = (linear(layer, g, g.abs())[0] for layer in (stream.base, stream.gate, stream.rate))
        z = rate * h
        e = torch.exp(rounded(z, U * z.abs()).clamp(EXP_FLOOR, EXP_CEIL))
        e = rounded(e, EXP_ROUNDOFF * e)
        ge = rounded(gate * e, U * (gate * e).abs())
        v = rounded(base + ge, U * (base.abs() + ge.abs()))
        o, _, _ = linear(stream.out, v, v.abs())
        o = F.leaky_relu(o, LEAKY_SLOPE)
        streams.append(rounded(o, U * o.abs()))
    head, _, _ = linear(m.head, torch.cat(streams, 1), torch.cat(streams, 1).abs())
    r = rounded(torch.tanh(head).squeeze(1), torch.tensor(TANH_ROUNDOFF, dtype=torch.float64))
    moved = rounded(scale * r, U * (scale * r).abs())
    step = rounded(centre + moved, U * (centre.abs() + moved.abs()))
    step.sum().backward()  # rows are independent: each row's derivatives land in that row
    bound = sum((z.grad.abs() * err).reshape(len(w), -1).sum(1) for z, err in taps)
    return step.detach(), bound


def assert_within_float32_error(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
    """|got − want| <= MARGIN · bound on every row (``want``, ``bound`` from ``step_error_bound``)."""
    err = (got.double() - want).abs()
    ratio = err / (MARGIN * bound)
    worst = int(ratio.nan_to_num(float("inf")).argmax())
    assert (err <= MARGIN * bound).all(), (
        f"row {worst}: |{got[worst].item():.9g} - {want[worst].item():.9g}| = {err[worst].item():.3g} > "
        f"{MARGIN} x float32 bound {bound[worst].item():.3g}; {(ratio > 1).sum().item()} of {len(ratio)} rows beyond")
