"""Meta-training samples: windows over a sweep's recorded stages, one sample per scalar weight.

A sweep records stages 0 (most data) … L-1 (least data). The window for target stage k takes the S stages
k+1 … k+S as input, ordered least data first (k+S … k+1, as KNOWN reads them), and stage k as the target:
with L = 7 and S = 5 there are two windows per scalar (k = 0 and k = 1). Scalars are grouped by the kind
of tensor they belong to (conv / linear / bias), one KNOWN per kind.
"""

from __future__ import annotations

import hashlib

import numpy as np

from known.model import S
from known.predict import PREDICTED_KINDS
from meta.shards import Sample

KIND_IDS = {k: i for i, k in enumerate(PREDICTED_KINDS)}


def window_targets(n_stages: int, s: int = S) -> list[int]:
    """Target stages k that have S recorded stages after them."""
    return list(range(n_stages - s))


def sweep_windows(sample: Sample, s: int = S) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """kind -> (x [n, S] least data first, y [n]) over every scalar of that kind and every window."""
    kinds = {m["name"]: m["kind"] for m in sample.record["tensors"]}
    out = {}
    for kind in PREDICTED_KINDS:
        names = [n for n, k in kinds.items() if k == kind]
        if not names:
            continue
        traj = np.concatenate([sample.tensors[n].reshape(sample.record["n_stages"], -1) for n in names], axis=1)
        traj = traj.astype(np.float32)  # [L, N], stage 0 = most data
        xs, ys = [], []
        for k in window_targets(traj.shape[0], s):
            xs.append(traj[k + 1 : k + s + 1][::-1].T)  # [N, S]: stage k+S first … k+1 last
            ys.append(traj[k])
        if xs:
            out[kind] = (np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys))
    return out


def is_validation(sweep_id: str, fraction: float) -> bool:
    """Deterministic split by sweep (never by scalar): the same sweep is always on the same side."""
    h = int(hashlib.sha256(sweep_id.encode()).hexdigest()[:8], 16) / 2**32
    return h < fraction
