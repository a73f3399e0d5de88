"""Initialisations to compare, the controls that make a KNOW gain mean something, and what each update is.

- naive: Θ0 (the most-data stage); predictions: ``retrodict`` ×1/r … ×1/r^steps per method;
- average: the plain mean of Θ0…Θ4 (weight averaging of the trajectory);
- shrink-perturb (Ash & Adams 2020): θ ← λθ0 + σε, with λ and σ fitted per tensor to a predictor's
  measured update, so a predictor only counts where it beats its own shrink-plus-noise;
- shrink (σ = 0, λ fitted per tensor to a predictor's update) and scaled (a fixed λ = 0.8^k): does a gain
  come from the shrink alone? (the naive controls with BN statistics reset and a larger fine-tuning lr are
  fine-tune settings of an ``Init``);
- decompose: how much of a predictor's update Θ̂ − Θ0 is a uniform shrink of Θ0, and how much more a
  step along Θ0 − Θ1 explains (R² over all predicted scalars);
- ``build_inits``: every initialisation of one experiment for one pre-trained model (``Init``: its
  description, weights and what its fine-tune changes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from collectors import data, zoo
from evaluation.config import TransferConfig
from evaluation.trajectories import Trajectory
from known.predict import PREDICTED_KINDS, retrodict

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


# -- an experiment's initialisations -------------------------------------------------------------------

@dataclass
class Init:
    """One initialisation to fine-tune from: its description (logged with every child run), its weights
    (None: from scratch), and what its fine-tune changes (the bn-reset and lr controls)."""

    desc: dict
    state: dict[str, torch.Tensor] | None
    finetune: dict = field(default_factory=dict)


def naive_controls(cfg: TransferConfig, traj: Trajectory, fresh: dict) -> dict[str, Init]:
    """naive Θ0, the oracles, and the controls that change Θ0 without a predictor: the trajectory average, BN
    statistics reset or BN at its initial values, larger fine-tuning rates, a fixed shrink, the last stage
    Θ_{S−1}, and Θ0's recipe trained to convergence."""
    r, theta0 = traj.r, traj.stages[0]
    out = {"naive": Init({"method": "naive", "step": 0}, theta0)}
    for m, state in traj.oracles.items():
        out[f"oracle-x{m}"] = Init({"method": "oracle", "step": round(math.log(m) / math.log(1 / r), 3), "multiplier": m}, state)
    if "average" in cfg.controls:
        out["average"] = Init({"method": "average", "step": 0}, average(traj.stages, traj.kinds))
    if "bn-reset" in cfg.controls:
        out["naive-bnreset"] = Init({"method": "bn-reset", "step": 0}, theta0, {"bn": "reset"})
    if "bn-init" in cfg.controls:
        out["naive-bninit"] = Init({"method": "bn-init", "step": 0}, bn_at_init(theta0, fresh, traj.kinds))
    if "lr" in cfg.controls:
        for f in cfg.lr_factors:
            out[f"naive-lr{f:g}"] = Init({"method": "lr", "lr_factor": f, "step": 0}, theta0, {"full_lr": cfg.downstream.full_lr * f})
    if "shrink-fixed" in cfg.controls:
        for k in range(1, cfg.steps + 1):
            lam = cfg.shrink_fixed ** k
            out[f"scaled-{k}"] = Init({"method": "scaled", "lambda": round(lam, 6), "step": k}, scaled(theta0, traj.kinds, lam))
    if "last" in cfg.controls:
        out["naive-last"] = Init({"method": "last", "step": 0, "multiplier": round(r ** (len(traj.stages) - 1), 4)}, traj.stages[-1])
    if "converged" in cfg.controls:
        out["naive-converged"] = Init({"method": "converged", "step": 0, "multiplier": 1}, traj.converged)
    return out


def predictions(cfg: TransferConfig, traj: Trajectory, models: dict, fresh: dict) -> tuple[dict[str, Init], list[dict], dict]:
    """Each method's predictions ×1/r … ×1/r^steps and the controls matched to each prediction's update
    (shrink-and-perturb, pure shrink); with ``predicted_bn: init`` all of them carry BatchNorm at its initial
    values, as the released scripts' predicted networks do. Also the update decomposition and the seconds."""
    theta0 = traj.stages[0]
    bn = (lambda st: bn_at_init(st, fresh, traj.kinds)) if cfg.predicted_bn == "init" else (lambda st: st)
    out, decomposition, wall = {}, [], {}
    for method in cfg.methods:
        t0 = time.perf_counter()
        preds = retrodict(traj.stages, cfg.steps, method, models=models.get(method), kinds=traj.kinds)
        wall[method] = time.perf_counter() - t0
        for k, pred in enumerate(preds, 1):
            out[f"{method}-{k}"] = Init({"method": method, "step": k}, bn(pred))
            decomposition.append({"init": f"{method}-{k}", **decompose(theta0, traj.stages[1], pred, traj.kinds)})
            if method not in cfg.shrink_perturb_for:
                continue
            if "shrink-perturb" in cfg.controls:
                sp = shrink_perturb(theta0, pred, traj.kinds, seed=cfg.seed + k)
                out[f"sp-{method}-{k}"] = Init({"method": "shrink-perturb", "matches": method, "step": k}, bn(sp))
            if "shrink" in cfg.controls:
                out[f"shrink-{method}-{k}"] = Init({"method": "shrink", "matches": method, "step": k},
                                                   bn(shrink(theta0, pred, traj.kinds)))
    return out, decomposition, wall


def build_inits(cfg: TransferConfig, traj: Trajectory, models: dict) -> tuple[dict[str, Init], list[dict], dict]:
    """init id -> Init; the update decomposition rows; prediction seconds per method."""
    fresh = None
    if "bn-init" in cfg.controls or cfg.predicted_bn == "init":  # the initial values BN takes there
        info = data.DATASETS[traj.task.dataset]
        torch.manual_seed(cfg.seed)
        fresh = zoo.build(traj.family, traj.arch, info.channels, len(traj.task.classes)).state_dict()
    out = naive_controls(cfg, traj, fresh)
    preds, decomposition, wall = predictions(cfg, traj, models, fresh)
    out |= preds
    for init in out.values():
        init.desc.setdefault("multiplier", round((1 / traj.r) ** init.desc["step"], 4))
    return out, decomposition, wall
