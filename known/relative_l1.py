"""The relative L1 error of a retrodiction, pooled: Σ|prediction − target| / Σ|newest − target|, both sums added
over every window, sweep and rank before the one ratio is taken. Pooling weighs every scalar the same; a mean of
per-window ratios would weigh a window of a 100-weight layer like one of a million, and let a window whose stage
barely moved (a tiny denominator) dominate. Meta-training's validation, ``known.validate`` and the
predictability report all count here."""

from __future__ import annotations

from collections.abc import Iterable

import torch

STEP = "step"  # keep-newest (the newest input as the prediction): every ratio's denominator


class PooledL1:
    """Σ|prediction − target| per (group, predictor), and per group keep-newest's under ``STEP``."""

    def __init__(self, keys: Iterable[tuple[str, str]] = ()):
        self.sums: dict[tuple[str, str], float] = dict.fromkeys(keys, 0.0)  # fixed keys: ranks reduce the same vector

    def add(self, group: str, predictor: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        key = (group, predictor)
        self.sums[key] = self.sums.get(key, 0.0) + (pred - target).abs().sum().item()

    def update(self, other: PooledL1) -> None:
        """Add ``other``'s sums (another sweep's, another rank's)."""
        for key, v in other.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + v

    def all_reduced(self, device) -> PooledL1:
        """These sums added over the process group's ranks (each counted its own windows), in place; the tensor
        lives on ``device`` (NCCL reduces CUDA tensors only). Every rank must hold the same keys."""
        import torch.distributed as dist

        keys = list(self.sums)
        total = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        self.sums = dict(zip(keys, total.tolist()))
        return self

    def ratio(self, predictor: str, groups: Iterable[str]) -> float:
        """Σ over ``groups`` of the predictor's error / Σ of keep-newest's; NaN where either was never counted."""
        groups = list(groups)
        if not groups or any((g, predictor) not in self.sums or (g, STEP) not in self.sums for g in groups):
            return float("nan")
        den = sum(self.sums[(g, STEP)] for g in groups)
        return sum(self.sums[(g, predictor)] for g in groups) / den if den else float("nan")
