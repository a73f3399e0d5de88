"""Per-coordinate baselines for stepping a trajectory back: TaskVector and least-squares curve fits.

All work on a window ``w`` [N, S] ordered as KNOWN reads it: index 0 = least data, S-1 = most data, and
predict the value at the next position τ = S (one stage more data). Each fit is linear in its parameters,
y = a + b·φ(τ), so its extrapolation is a fixed linear combination of the window: one matmul for any N.

- taskvector: w[S-1] + λ (w[S-1] − w[S-2]), λ = 0.2 (Θ0 + 0.2(Θ0 − Θ1) in stage terms);
- linearfit:  φ(τ) = τ (linear in the stage index, i.e. in log data size);
- logfit:     φ(τ) = ln(1 + τ) (a saturating trend);
- expfit:     φ(τ) = exp(τ) (a trend that accelerates, like the data size itself, which grows by 1/r per stage).
"""

from __future__ import annotations

import functools
import math

import torch

TASKVECTOR_LAMBDA = 0.2

_PHI = {"linearfit": lambda t: t, "logfit": lambda t: math.log1p(t), "expfit": lambda t: math.exp(t)}
METHODS = ("taskvector", *_PHI)


@functools.lru_cache(maxsize=None)
def coefficients(method: str, n: int) -> tuple[float, ...]:
    """c such that prediction = w @ c for a window of length n."""
    if method == "taskvector":
        c = [0.0] * n
        c[-1], c[-2] = 1 + TASKVECTOR_LAMBDA, -TASKVECTOR_LAMBDA
        return tuple(c)
    if method not in _PHI:
        raise ValueError(f"unknown baseline {method!r}; known: {list(METHODS)}")
    phi = _PHI[method]
    X = torch.tensor([[1.0, phi(t)] for t in range(n)], dtype=torch.float64)
    x_new = torch.tensor([1.0, phi(n)], dtype=torch.float64)
    return tuple((x_new @ torch.linalg.pinv(X)).tolist())  # least-squares fit, evaluated at τ = n


def predict(method: str, w: torch.Tensor) -> torch.Tensor:
    """The next value of every row of ``w`` [N, S] under ``method``."""
    c = torch.tensor(coefficients(method, w.shape[1]), dtype=w.dtype, device=w.device)
    return w @ c


class Baseline:
    """A baseline as a KNOW step (``known.predict.Stepper``), so callers step every method the same way."""

    CHUNK = 1 << 22  # one matmul per 4M rows: chunking only bounds memory, the result does not depend on it

    def __init__(self, method: str):
        coefficients(method, 2)  # an unknown method fails here, naming it
        self.method = method

    def to(self, device) -> Baseline:
        return self

    def step(self, w: torch.Tensor, rms: torch.Tensor | None, chunk: int, threads: int = 1) -> torch.Tensor:
        """The next value of every row of ``w`` [N, S] (``rms``, ``threads``: unused, a fit reads the window alone)."""
        if len(w) <= chunk:
            return predict(self.method, w)
        return torch.cat([predict(self.method, w[i : i + chunk]) for i in range(0, len(w), chunk)])
