"""Statistics for paired seeds: every method is fine-tuned with the same seeds, so compare seed by seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Paired:
    n: int
    mean: float  # mean of (a - b) over seeds
    std: float  # sample std of the differences
    ci_low: float  # 95% t confidence interval of the mean difference
    ci_high: float
    p: float  # two-sided paired t-test
    wins: int  # seeds where a > b


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def paired(a, b, confidence: float = 0.95) -> Paired:
    """Paired difference a − b with a t confidence interval and a paired t-test; ``a[i]`` and ``b[i]``
    share seed i. With all differences equal there is no spread to test against: the interval has zero
    width and p is nan (1 when every difference is 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples need equal 1-D shapes, got {a.shape} and {b.shape}")
    if len(a) < 2:
        raise ValueError(f"a paired test needs at least 2 seeds, got {len(a)}")
    d = a - b
    n, mean, std = len(d), float(d.mean()), float(d.std(ddof=1))
    if std == 0:
        return Paired(n, mean, 0.0, mean, mean, 1.0 if mean == 0 else float("nan"), int((d > 0).sum()))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    p = float(stats.ttest_rel(a, b).pvalue)
    return Paired(n, mean, std, mean - half, mean + half, p, int((d > 0).sum()))


def clustered(a, b, clusters, confidence: float = 0.95) -> Paired:
    """Paired difference a − b with the *cluster* as the unit: differences are averaged within each cluster
    (one pre-training seed), then tested across clusters. Downstream seeds that share a pre-trained model are
    not independent draws of "a pre-trained model", so pooling them overstates the evidence; this does not.
    Needs at least 2 clusters (and has little power with few)."""
    a, b, c = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), np.asarray(clusters)
    if not (a.shape == b.shape == c.shape) or a.ndim != 1:
        raise ValueError(f"clustered samples need equal 1-D shapes, got {a.shape}, {b.shape} and {c.shape}")
    keys = sorted(set(c.tolist()))
    if len(keys) < 2:
        raise ValueError(f"a clustered test needs at least 2 clusters, got {len(keys)}")
    ma = [a[c == k].mean() for k in keys]
    mb = [b[c == k].mean() for k in keys]
    return paired(ma, mb, confidence)


def holm(pvalues) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error), in the input order. nan stays nan and does not
    count towards the family size. Many comparisons per experiment: one p < 0.05 among twenty is chance."""
    p = [float(x) for x in pvalues]
    idx = sorted((i for i, x in enumerate(p) if not math.isnan(x)), key=lambda i: p[i])
    m, out, running = len(idx), list(p), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _cluster_bootstrap(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights of a two-stage bootstrap: clusters drawn with replacement, then pairs within each
    drawn cluster. Rows of the returned [n_boot, clusters × largest] arrays; a weight of 0 pads a small cluster."""
    keys = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in keys]
    sizes = np.array([len(m) for m in members])
    padded = np.zeros((len(keys), sizes.max()), dtype=np.int64)
    for i, m in enumerate(members):
        padded[i, : len(m)] = m
    picks = rng.integers(0, len(keys), (n_boot, len(keys)))
    pos = (rng.random((n_boot, len(keys), sizes.max())) * sizes[picks][..., None]).astype(np.int64)
    weight = (np.arange(sizes.max())[None, None, :] < sizes[picks][..., None]).astype(np.float64)
    idx = padded[picks[..., None], pos]
    return idx.reshape(n_boot, -1), weight.reshape(n_boot, -1)


def gap_closed(init, naive, oracle, clusters=None, confidence: float = 0.95, n_boot: int = 4000,
               seed: int = 0) -> tuple[float, float, float]:
    """Fraction of the oracle gap an initialisation closes, (init − naive) / (oracle − naive) of the paired
    means, with a percentile bootstrap interval. With ``clusters`` (the pre-training seed of each pair) the
    bootstrap has two stages: pre-trained models are drawn with replacement, then pairs within each, so the
    interval counts the pre-trained model as a random draw, not a fixed one (with 3 models it is wide, and
    says so). A ratio has no t interval; where the gap itself is not clearly above zero, the interval is wide
    or unbounded. Returns (fraction, low, high); nan where the gap is 0."""
    a, b, c = (np.asarray(v, dtype=np.float64) for v in (init, naive, oracle))
    if not (a.shape == b.shape == c.shape) or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"gap_closed needs equal 1-D samples of at least 2 pairs, got {a.shape}, {b.shape}, {c.shape}")
    groups = np.zeros(len(a), dtype=np.int64) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    if groups.shape != a.shape:
        raise ValueError(f"clusters have shape {groups.shape}, the samples {a.shape}")
    idx, w = _cluster_bootstrap(groups, n_boot, np.random.default_rng(seed))
    gap, lift = ((c - b)[idx] * w).sum(1) / w.sum(1), ((a - b)[idx] * w).sum(1) / w.sum(1)
    boots = lift[gap != 0] / gap[gap != 0]
    point = (a - b).mean() / (c - b).mean() if (c - b).mean() != 0 else float("nan")
    if not len(boots):
        return float(point), float("nan"), float("nan")
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(point), float(lo), float(hi)
