"""KNOWN: the per-scalar hyper-model that steps a weight's forgetting trajectory one stage back.

Input: the S=5 recorded values of one scalar weight, ordered as in the paper's code — index 0 is the stage
trained on the *least* data, index S-1 the stage trained on the *most* data — plus their S-1 successive
differences. Output: a tanh-bounded residual added to the most-data value. 9,425 parameters.

Input modes (``inputs``; the network is the same 9,425 parameters in each, the mode is stored with the weights):
- ``raw``: the paper's and the official model's — raw values in, raw residual out (L1 on the raw residual);
- ``scaled``: each window centred on its most-data value and divided by its path length Σ|Δ|, the residual
  multiplied back by it — one KNOWN for layers of any scale, but translation-invariant: it cannot see a
  weight's magnitude, so it cannot express a shrink towards zero;
- ``rms``: every window of a tensor divided by that tensor's RMS at the window's most-data stage, not
  centred, the residual multiplied back by it — scale-free like ``scaled`` and magnitude-aware like ``raw``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

S = 5
LEAKY_SLOPE = 0.3  # Keras' LeakyReLU default, which the official model uses
EXP_FLOOR, EXP_CEIL = -60.0, 60.0
TINY = 1e-12  # keeps the scale of a weight that never moved positive (its input is then all zeros)
InputMode = Literal["raw", "scaled", "rms"]
INPUT_MODES: tuple[InputMode, ...] = ("raw", "scaled", "rms")
DEFAULT_INPUTS: InputMode = "rms"  # the best on held-out sweeps (docs/known.md): what a new KNOWN reads
PREDICTED_KINDS = ("conv", "linear", "bias")  # one KNOWN each; every other tensor kind is copied from Θ0


def segment_rms(values: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Each element's tensor RMS: ``values`` is tensors of ``sizes`` elements laid end to end."""
    sizes_t = torch.as_tensor(list(sizes), device=values.device)
    seg = torch.repeat_interleave(torch.arange(len(sizes_t), device=values.device), sizes_t)
    sq = torch.zeros(len(sizes_t), dtype=values.dtype, device=values.device).index_add_(0, seg, values * values)
    return (sq / sizes_t.to(values.dtype)).sqrt()[seg]


def _scaled_uniform_(layer: nn.Linear, scale: float = 0.1) -> None:
    """Keras VarianceScaling(scale, fan_in, uniform) with zero bias, as the official model initialises."""
    bound = math.sqrt(3.0 * scale / layer.in_features)
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)


class Stream(nn.Module):
    """Linear(n→64) → gated-exponential block → Linear(64→32) → LeakyReLU(0.3).

    The block: g = relu(squeeze(h)); h' = base(g) + gate(g) * exp(rate(g) * h), as in the official code.
    """

    def __init__(self, n_in: int):
        super().__init__()
        self.inp = nn.Linear(n_in, 64)
        self.squeeze = nn.Linear(64, 8)
        self.base = nn.Linear(8, 64)
        self.gate = nn.Linear(8, 64)
        self.rate = nn.Linear(8, 64)
        self.out = nn.Linear(64, 32)
        _scaled_uniform_(self.inp)
        _scaled_uniform_(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        g = F.relu(self.squeeze(h))
        # exp's argument is floored at -60: below that exp() underflows towards denormal floats, which
        # make x86 CPUs crawl (a ResNet18-sized step took 14-21 s instead of ~4 s), while e^-60 ≈ 1e-26
        # changes no output that float32 can represent next to the base term; capped at +60 so that an
        # input far out of the training range saturates the tanh output instead of making inf − inf = NaN
        h = self.base(g) + self.gate(g) * torch.exp((self.rate(g) * h).clamp(EXP_FLOOR, EXP_CEIL))
        return F.leaky_relu(self.out(h), LEAKY_SLOPE)


def prepare(inputs: InputMode, w: torch.Tensor, rms: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(network input, centre, scale) of windows ``w`` [N, S] in input mode ``inputs``: a prediction is
    centre + scale * residual. ``rms``: each row's tensor RMS at its most-data stage (``segment_rms``), needed
    by the rms mode."""
    centre = w[:, -1]
    if inputs == "raw":
        return w, centre, torch.ones_like(centre)
    if inputs == "scaled":
        scale = (w[:, 1:] - w[:, :-1]).abs().sum(1) + TINY  # path length over the window
        return (w - centre[:, None]) / scale[:, None], centre, scale
    if rms is None:
        raise ValueError("a KNOWN with inputs='rms' needs each window's tensor RMS")
    scale = rms + TINY
    return w / scale[:, None], centre, scale


class KNOWN(nn.Module):
    def __init__(self, n_stages: int = S, inputs: InputMode = DEFAULT_INPUTS):
        super().__init__()
        if inputs not in INPUT_MODES:
            raise ValueError(f"unknown KNOWN input mode {inputs!r}; known: {list(INPUT_MODES)}")
        self.n_stages = n_stages
        self.inputs = inputs
        self.values = Stream(n_stages)
        self.diffs = Stream(n_stages - 1)
        self.head = nn.Linear(64, 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Residual for each row of ``w`` [N, S] (least-data stage first); returns [N]."""
        d = w[:, 1:] - w[:, :-1]
        return torch.tanh(self.head(torch.cat([self.values(w), self.diffs(d)], dim=1))).squeeze(1)

    def prepare(self, w: torch.Tensor, rms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(network input, centre, scale) of windows ``w`` in this KNOWN's input mode (``prepare``)."""
        return prepare(self.inputs, w, rms)

    def step(self, w: torch.Tensor, rms: torch.Tensor | None = None) -> torch.Tensor:
        """The predicted value one stage beyond the most-data stage: w[:, -1] + residual."""
        x, centre, scale = self.prepare(w, rms)
        return centre + scale * self(x)

    def loss(self, w: torch.Tensor, target: torch.Tensor, rms: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean L1 between the residual and the target's in the network's units, fraction of targets beyond ±1).

        Targets beyond tanh's reach are clipped to ±1 (the L1 gradient is unchanged, the loss stays readable)
        and counted, so that a mode whose targets the network cannot reach shows it.
        """
        x, centre, scale = self.prepare(w, rms)
        t = (target - centre) / scale
        return (self(x) - t.clamp(-1, 1)).abs().mean(), (t.abs() > 1).float().mean()
