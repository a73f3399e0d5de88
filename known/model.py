"""KNOWN: the per-scalar hyper-model that steps a weight's forgetting trajectory one stage back.

Input: the S=5 recorded values of one scalar weight, ordered as in the paper's code — index 0 is the stage
trained on the *least* data, index S-1 the stage trained on the *most* data — plus their S-1 successive
differences. Output: a tanh-bounded residual added to the most-data value. 9,425 parameters.

Input scaling (ours; the official model reads raw values): with ``scaled=True`` each window is centred on
its most-data value and divided by its path length Σ|Δ|, and the residual is multiplied back by it. KNOWN
then learns the *shape* of a trajectory, whatever the scale of the layer (README: why, and the
validation numbers of the shipped KNOWN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

S = 5
LEAKY_SLOPE = 0.3  # Keras' LeakyReLU default, which the official model uses
EXP_FLOOR = -60.0
TINY = 1e-12  # keeps the scale of a weight that never moved positive (its input is then all zeros)


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
        # changes no output that float32 can represent next to the base term
        h = self.base(g) + self.gate(g) * torch.exp((self.rate(g) * h).clamp_min(EXP_FLOOR))
        return F.leaky_relu(self.out(h), LEAKY_SLOPE)


class KNOWN(nn.Module):
    def __init__(self, n_stages: int = S, scaled: bool = True):
        super().__init__()
        self.n_stages = n_stages
        self.scaled = scaled
        self.values = Stream(n_stages)
        self.diffs = Stream(n_stages - 1)
        self.head = nn.Linear(64, 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Residual for each row of ``w`` [N, S] (least-data stage first); returns [N]."""
        d = w[:, 1:] - w[:, :-1]
        return torch.tanh(self.head(torch.cat([self.values(w), self.diffs(d)], dim=1))).squeeze(1)

    def prepare(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(network input, centre, scale) of windows ``w``: prediction = centre + scale * forward(input)."""
        centre = w[:, -1]
        if not self.scaled:
            return w, centre, torch.ones_like(centre)
        scale = (w[:, 1:] - w[:, :-1]).abs().sum(1) + TINY  # path length over the window
        return (w - centre[:, None]) / scale[:, None], centre, scale

    def step(self, w: torch.Tensor) -> torch.Tensor:
        """The predicted value one stage beyond the most-data stage: w[:, -1] + residual."""
        x, centre, scale = self.prepare(w)
        return centre + scale * self(x)

    def loss(self, w: torch.Tensor, target: torch.Tensor, forward=None) -> torch.Tensor:
        """Mean L1 between the residual and the target's, in the network's (scaled) units.

        Targets beyond tanh's reach are clipped to ±1: the L1 gradient is unchanged, the reported loss stays
        readable when a weight that did not move in the window moves at the target. ``forward`` is the
        callable to train through (a DDP wrapper of this module), default this module.
        """
        x, centre, scale = self.prepare(w)
        return ((forward or self)(x) - ((target - centre) / scale).clamp(-1, 1)).abs().mean()
