"""The experiment's figures, as PNG files: accuracy by method and multiplier, the forgetting curve, and the
paper's Fig. 3 view (trajectory and predictions on the trajectory's PCA plane over an accuracy contour)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy(rows: Sequence[Mapping], path: Path) -> Path:
    """Mean ± std downstream accuracy (head-only and full fine-tuning) per initialisation."""
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.45 * len(rows) + 4), 4.5), sharey=False)
    names = [r["init"] for r in rows]
    x = np.arange(len(rows))
    naive = next((r for r in rows if r["init"] == "naive"), None)
    for ax, phase in zip(axes, ("head", "full")):
        means = [100 * r[f"{phase}_mean"] for r in rows]
        stds = [100 * r[f"{phase}_std"] for r in rows]
        colors = ["tab:gray" if r["method"] in ("naive", "scratch") else "tab:orange" if r["method"] in ("average", "shrink-perturb") else "tab:blue" for r in rows]
        ax.bar(x, means, yerr=stds, color=colors, capsize=3)
        if naive:
            ax.axhline(100 * naive[f"{phase}_mean"], color="k", lw=0.8, ls="--", label="naive (Θ0)")
        lo = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0, lo - 2), min(100, max(m + s for m, s in zip(means, stds)) + 1))
        ax.set_xticks(x, names, rotation=75, fontsize=7)
        ax.set_title(f"downstream accuracy after {'the head-only phase' if phase == 'head' else 'full fine-tuning'}")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
    return _save(fig, path)


def lr_curves(table: Sequence[Mapping], path: Path) -> Path:
    """Validation and test accuracy against the full-phase learning-rate factor, one line per initialisation,
    the selected factor marked: where each arm's optimum lies and whether the grid brackets it."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    colors = plt.cm.tab20(np.linspace(0, 1, 20))  # a dozen arms: the default cycle repeats after ten
    for i, row in enumerate(table):
        f = sorted(row["val"])
        for ax, split in zip(axes, ("val", "test")):
            color = colors[i % 20]
            ax.plot(f, [100 * row[split][x] for x in f], "o-", lw=1, ms=3, label=row["init"], color=color)
            ax.plot([row["selected"]], [100 * row[split][row["selected"]]], "*", ms=11, color=color)
    for ax, split in zip(axes, ("validation (selects the rate)", "test (reported)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("full-phase learning rate × config's")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(split)
    axes[1].legend(fontsize=7, ncol=2)
    return _save(fig, path)


def forgetting(curves: Mapping[int, Mapping[str, Sequence[float]]], path: Path) -> Path:
    """Source-task test accuracy of Θ0…Θ4 per pre-training seed, BN statistics kept and re-estimated."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for seed, c in curves.items():
        k = np.arange(len(c["bn_reestimated"]))
        ax.plot(k, 100 * np.asarray(c["bn_reestimated"]), "o-", label=f"seed {seed}, BN re-estimated")
        ax.plot(k, 100 * np.asarray(c["bn_kept"]), "x:", alpha=0.6, label=f"seed {seed}, BN kept")
    ax.set_xlabel("stage k (|Dk| = r^k |D0|)")
    ax.set_ylabel("source test accuracy (%)")
    ax.set_title("forgetting curve")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _accuracy_grid(theta0, names, centre, basis, xy: np.ndarray, grid: int, accuracy_of):
    """The plane's coordinates around the points ``xy`` (a quarter of their span beyond them) and the accuracy
    of the weights at each grid point (``names`` on the plane, the rest at Θ0)."""
    span = np.ptp(xy, axis=0).max() or 1.0
    lo, hi = xy.min(0) - 0.25 * span, xy.max(0) + 0.25 * span
    from tqdm import tqdm

    gx, gy = np.linspace(lo[0], hi[0], grid), np.linspace(lo[1], hi[1], grid)
    acc = np.zeros((grid, grid))
    sizes = [theta0[n].numel() for n in names]
    # each point re-estimates BatchNorm and tests on the source task: minutes for a CIFAR-10 model, so a bar
    for i, j in tqdm([(i, j) for i in range(grid) for j in range(grid)], desc="PCA-plane accuracy", unit="point"):
        vec = centre + gx[i] * basis[0] + gy[j] * basis[1]
        state = {k: t.clone() for k, t in theta0.items()}
        for n, part in zip(names, torch.split(vec, sizes)):
            state[n] = part.reshape(theta0[n].shape).to(theta0[n].dtype)
        acc[j, i] = accuracy_of(state)
    return gx, gy, acc


def pca_plane(stages: Sequence[Mapping[str, torch.Tensor]], predictions: Mapping[str, Mapping[str, torch.Tensor]],
              names: Sequence[str], accuracy_of: Callable[[dict[str, torch.Tensor]], float], path: Path,
              grid: int = 9) -> tuple[Path, dict[str, float]]:
    """Fig. 3 of the paper: Θ0…Θ4 and the predicted weights projected on the trajectory's 2-D PCA plane,
    over the source accuracy of the plane (tensors ``names`` move on the plane; the rest stay at Θ0).
    Returns the path and, per prediction, the share of its offset from the plane's centre that lies off
    the plane (a prediction far off the plane is not shown faithfully)."""
    def flat(st):
        return torch.cat([st[n].double().flatten() for n in names])

    traj = torch.stack([flat(s) for s in stages])
    centre = traj.mean(0)
    _, _, v = torch.linalg.svd(traj - centre, full_matrices=False)
    basis = v[:2]  # [2, P]
    pts = {f"Θ{k}": basis @ (t - centre) for k, t in enumerate(traj)}
    off = {}
    for name, st in predictions.items():
        d = flat(st) - centre
        proj = basis @ d
        pts[name] = proj
        spread = (traj - centre).norm(dim=1).max()
        off[name] = float(((d - basis.T @ proj).norm() / d.norm()).item()) if d.norm() > 1e-6 * spread else 0.0
    gx, gy, acc = _accuracy_grid(stages[0], names, centre, basis, torch.stack(list(pts.values())).numpy(), grid, accuracy_of)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    cs = ax.contourf(gx, gy, 100 * acc, levels=12, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="source test accuracy (%)")
    t = np.stack([pts[f"Θ{k}"].numpy() for k in range(len(stages))])
    ax.plot(t[:, 0], t[:, 1], "w.-", lw=1.5, label="trajectory Θ0…Θ4")
    for k, (px, py) in enumerate(t):
        ax.annotate(f"Θ{k}", (px, py), color="w", fontsize=8, xytext=(3, 3), textcoords="offset points")
    markers = iter("^sDvP*<>ph")
    for name, p in pts.items():
        if not name.startswith("Θ"):
            ax.plot(p[0], p[1], next(markers, "o"), ms=7, label=f"{name} (off-plane {off[name]:.0%})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("weights on the trajectory's PCA plane")
    ax.legend(fontsize=6, loc="best")
    return _save(fig, path), off
