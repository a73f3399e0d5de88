"""Meta-training samples: windows over a sweep's recorded stages, one sample per scalar weight.

A sweep records stages 0 (most data) … L-1 (least data). The window for target stage k takes the S stages
k+1 … k+S as input, ordered least data first (k+S … k+1, as KNOWN reads them), and stage k as the target:
with L = 7 and S = 5 there are two windows per scalar (k = 0 and k = 1). Scalars are grouped by the kind
of tensor they belong to (conv / linear / bias), one KNOWN per kind.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from known.model import S, segment_rms
from known.predict import PREDICTED_KINDS
from meta.shards import Sample

KIND_IDS = {k: i for i, k in enumerate(PREDICTED_KINDS)}


def window_targets(n_stages: int, s: int = S) -> list[int]:
    """Target stages k that have S recorded stages after them."""
    return list(range(n_stages - s))


@dataclass
class Windows:
    """One kind's windows of a sweep: x [n, S] least data first, target y [n], and each row's tensor RMS at
    its most-data input stage (what the ``rms`` input mode divides by)."""

    x: np.ndarray
    y: np.ndarray
    rms: np.ndarray


def kind_trajectory(sample: Sample, kind: str) -> tuple[np.ndarray, list[int]] | None:
    """([L, N] float32, stage 0 = most data, every scalar of ``kind`` laid end to end; tensor sizes) or None."""
    names = [n for n, k in sample.record.kinds.items() if k == kind]
    if not names:
        return None
    flat = [sample.tensors[n].reshape(sample.record.n_stages, -1) for n in names]
    return np.concatenate(flat, axis=1).astype(np.float32), [f.shape[1] for f in flat]


def sweep_windows(sample: Sample, s: int = S) -> dict[str, Windows]:
    """kind -> its ``Windows`` over every scalar of that kind and every window."""
    out = {}
    for kind in PREDICTED_KINDS:
        found = kind_trajectory(sample, kind)
        if found is not None and (w := trajectory_windows(*found, s)) is not None:
            out[kind] = w
    return out


def rescaled(traj: np.ndarray, sizes: list[int], ref: int) -> np.ndarray:
    """Every stage of ``traj`` with each tensor scaled to stage ``ref``'s norm of that tensor: the direction of
    each tensor kept, its norm taken out (a tensor that is all zeros stays zero)."""
    t = torch.from_numpy(traj).double()
    rms = torch.stack([segment_rms(row, sizes) for row in t])
    factor = torch.where(rms > 0, rms[ref] / rms.clamp_min(1e-300), torch.ones_like(rms))
    return (t * factor).to(torch.float32).numpy()


def trajectory_windows(traj: np.ndarray, sizes: list[int], s: int = S, direction: bool = False) -> Windows | None:
    """The ``Windows`` of one kind's trajectory [L, N] (stage 0 = most data; ``sizes``: its tensors laid end to
    end), or None when it has fewer than S + 1 stages. With ``direction`` every window's stages are first
    ``rescaled`` to its newest input's per-tensor norms: what is left to predict is the direction alone."""
    xs, ys, rs = [], [], []
    for k in window_targets(traj.shape[0], s):
        t = rescaled(traj, sizes, k + 1) if direction else traj
        xs.append(t[k + 1 : k + s + 1][::-1].T)  # [N, S]: stage k+S first … k+1 last
        ys.append(t[k])
        rs.append(segment_rms(torch.from_numpy(t[k + 1]), sizes).numpy())
    return Windows(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), np.concatenate(rs)) if xs else None


def is_validation(sweep_id: str, fraction: float) -> bool:
    """Deterministic split by sweep (never by scalar): the same sweep is always on the same side."""
    h = int(hashlib.sha256(sweep_id.encode()).hexdigest()[:8], 16) / 2**32
    return h < fraction
