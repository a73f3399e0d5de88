"""Initialisations to compare, the controls that make a KNOW gain mean something, and what each update is.

- naive: Θ0 (the most-data stage); predictions: ``retrodict`` ×1/r … ×1/r^steps per method;
- average: the plain mean of Θ0…Θ4 (weight averaging of the trajectory);
- shrink-perturb (Ash & Adams 2020): θ ← λθ0 + σε, with λ and σ fitted per tensor to a predictor's
  measured update, so a predictor only counts where it beats its own shrink-plus-noise;
- shrink (σ = 0, λ fitted per tensor to a predictor's update) and scaled (a fixed λ = 0.8^k): does a gain
  come from the shrink alone? (the naive controls with BN statistics reset and a larger fine-tuning lr are
  fine-tune settings of ``evaluation.transfer.build_inits``);
- decompose: how much of a predictor's update Θ̂ − Θ0 is a uniform shrink of Θ0, and how much more a
  step along Θ0 − Θ1 explains (R² over all predicted scalars).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from known.predict import PREDICTED_KINDS

State = dict[str, torch.Tensor]


def predicted_names(kinds: Mapping[str, str]) -> list[str]:
    return [n for n, k in kinds.items() if k in PREDICTED_KINDS]


def average(stages: Sequence[Mapping[str, torch.Tensor]], kinds: Mapping[str, str]) -> State:
    """Mean of the stages for every predicted tensor; BatchNorm and buffers from Θ0 (as the predictors do)."""
    out = {n: t.clone() for n, t in stages[0].items()}
    for n in predicted_names(kinds):
        out[n] = torch.stack([s[n].float() for s in stages]).mean(0).to(stages[0][n].dtype)
    return out


def _shrink(u: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """Least-squares λ−1 with u ≈ (λ−1)·w0."""
    den = (w0 * w0).sum()
    return (u * w0).sum() / den if den > 0 else torch.zeros((), dtype=u.dtype)


def shrink_perturb(theta0: Mapping[str, torch.Tensor], predicted: Mapping[str, torch.Tensor],
                   kinds: Mapping[str, str], seed: int) -> State:
    """λθ0 + σε per predicted tensor, λ and σ matched to ``predicted`` − ``theta0`` (σ: RMS of what the
    shrink does not explain); ε seeded, so the control is reproducible."""
    gen = torch.Generator().manual_seed(seed)
    out = {n: t.clone() for n, t in theta0.items()}
    for n in predicted_names(kinds):
        w0 = theta0[n].double()
        u = predicted[n].double() - w0
        shrink = _shrink(u, w0)
        sigma = (u - shrink * w0).pow(2).mean().sqrt()
        noise = torch.randn(w0.shape, generator=gen, dtype=torch.float64)
        out[n] = ((1 + shrink) * w0 + sigma * noise).to(theta0[n].dtype)
    return out


def shrink(theta0: Mapping[str, torch.Tensor], predicted: Mapping[str, torch.Tensor], kinds: Mapping[str, str]) -> State:
    """λθ0 per predicted tensor with λ fitted to ``predicted`` − ``theta0`` and no noise: what the predictor's
    update is worth if only its uniform shrink mattered (behind BatchNorm, a shrink raises the effective
    fine-tuning learning rate and changes nothing else)."""
    out = {n: t.clone() for n, t in theta0.items()}
    for n in predicted_names(kinds):
        w0 = theta0[n].double()
        out[n] = ((1 + _shrink(predicted[n].double() - w0, w0)) * w0).to(theta0[n].dtype)
    return out


def bn_at_init(state: Mapping[str, torch.Tensor], fresh: Mapping[str, torch.Tensor], kinds: Mapping[str, str]) -> State:
    """``state`` with every normalisation parameter and buffer as a freshly built model has them: what the
    released scripts' predicted networks carry (they load only layers holding exactly a kernel and a bias)."""
    return {n: (fresh[n].clone() if kinds[n] in ("norm", "buffer") else t.clone()) for n, t in state.items()}


def scaled(theta0: Mapping[str, torch.Tensor], kinds: Mapping[str, str], factor: float) -> State:
    """Every predicted tensor of θ0 times ``factor`` (the fixed-shrink control, λ = 0.8^k)."""
    out = {n: t.clone() for n, t in theta0.items()}
    for n in predicted_names(kinds):
        out[n] = theta0[n] * factor
    return out


def decompose(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor],
              predicted: Mapping[str, torch.Tensor], kinds: Mapping[str, str]) -> dict[str, float]:
    """Shrink and direction content of the update u = Θ̂ − Θ0, fitted per tensor, pooled over tensors:
    lambda (numel-weighted mean λ), r2_shrink (u ≈ (λ−1)Θ0), r2_shrink_dir (u ≈ (λ−1)Θ0 + β(Θ0 − Θ1)),
    update_rel (‖u‖ / ‖Θ0‖)."""
    total = res_shrink = res_both = norm0 = lam_sum = count = 0.0
    for n in predicted_names(kinds):
        w0, w1 = theta0[n].double().flatten(), theta1[n].double().flatten()
        u = predicted[n].double().flatten() - w0
        s = _shrink(u, w0)
        r1 = u - s * w0
        d = w0 - w1
        # both regressors at once: least squares on [w0, d]
        a = torch.stack([w0, d], 1)
        coef = torch.linalg.lstsq(a, u[:, None]).solution if a.abs().sum() > 0 else torch.zeros(2, 1, dtype=u.dtype)
        r2 = u - (a @ coef)[:, 0]
        total += float(u.pow(2).sum())
        res_shrink += float(r1.pow(2).sum())
        res_both += float(r2.pow(2).sum())
        norm0 += float(w0.pow(2).sum())
        lam_sum += float(1 + s) * len(w0)
        count += len(w0)
    if total == 0:
        return {"lambda": lam_sum / max(count, 1), "r2_shrink": float("nan"), "r2_shrink_dir": float("nan"), "update_rel": 0.0}
    return {"lambda": lam_sum / count, "r2_shrink": 1 - res_shrink / total, "r2_shrink_dir": 1 - res_both / total,
            "update_rel": (total / norm0) ** 0.5 if norm0 else float("nan")}
