"""How much per-coordinate signal a meta-dataset carries: can anything predict a stage from the five after it?

    python -m known.predictability --collection runs/protocols/today runs/protocols/long-cosine … --out docs/predictability.md

For every sweep and kind (conv / linear / bias), over the windows KNOWN trains on (inputs Θk+5 … Θk+1,
target Θk), the relative L1 error Σ|Θ̂k − Θk| / Σ|Θk+1 − Θk| of:
- keep-newest (1.0 by definition), TaskVector and LinearFit (``known.baselines``), any KNOWN given;
- two *in-sample oracles*, fitted (in L1) to the sweep's own targets, per sweep and kind (ceilings of
  per-coordinate linear rules, not predictors): ``oracle-Δ`` = newest + β·(the 4 differences) —
  translation-invariant, what a centred input can express — and ``oracle`` = β·(the 5 values), which can
  also shrink towards zero.
Norm versus direction: each kind's L2 norm by stage (Adam without weight decay behind BatchNorm grows norms with
every step, so stepping "back" along a sweep shrinks by construction), and the same errors with every window's
stages rescaled to its newest input's per-tensor norms (``known.windows.rescaled``): the direction alone.
Beside them: the mean cosine between successive stage updates (Θk − Θk+1 vs Θk+1 − Θk+2; ≈ 0 = noise),
the fraction of targets beyond the ±1 a KNOWN can output in each input mode, and the source test loss and
accuracy by stage (does forgetting show?). Sweeps whose Θ0 never learned (test accuracy within
``CHANCE_MARGIN`` of chance) are counted and left out unless ``--keep-unlearned``. Each root is one
protocol (labelled by its folder name); the report goes to stdout or ``--out`` and to an MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from known import KnownError, predict
from known.predict import PREDICTED_KINDS as KINDS
from known.relative_l1 import STEP, PooledL1
from meta import catalog, cli, readers, storage, verify
from meta.errors import OblivionError
from meta.shards import Sample

log = logging.getLogger(__name__)
PREDICTORS = ("taskvector", "linearfit", "oracle-Δ", "oracle")
TINY = 1e-12
RECORDED, DIRECTION = "recorded", "direction"  # the trajectory as recorded; each window rescaled to its newest norms


class PredictabilityError(KnownError):
    """Input the report cannot be made from; the message names it."""


@dataclass
class KindStats:
    """Error sums of one kind of one sweep (ratios are taken after pooling sweeps)."""

    n: int = 0
    l1: PooledL1 = field(default_factory=PooledL1)  # groups RECORDED and DIRECTION (the norm-rescaled windows)
    beyond: dict[str, float] = field(default_factory=dict)  # input mode -> targets beyond ±1 (count)
    cosine: float = float("nan")  # mean cosine between successive stage updates

    def add(self, other: KindStats) -> None:
        self.n += other.n
        self.l1.update(other.l1)
        for k, v in other.beyond.items():
            self.beyond[k] = self.beyond.get(k, 0.0) + v

    def ratio(self, predictor: str) -> float:
        """Pooled relative L1 of ``predictor``; "dir:<predictor>": on the direction alone."""
        direction = predictor.startswith("dir:")
        return self.l1.ratio(predictor.removeprefix("dir:"), [DIRECTION if direction else RECORDED])


@dataclass
class SweepStats:
    sweep_id: str
    label: str
    family: str
    dataset: str
    learned: bool
    test_acc: list[float]
    test_loss: list[float]
    kinds: dict[str, KindStats]
    norms: dict[str, list[float]] = field(default_factory=dict)  # kind -> L2 norm of all its scalars, by stage


def _l1_fit(feats: torch.Tensor, target: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Least-absolute-deviation coefficients (iteratively reweighted least squares from the L2 fit): the
    oracles are scored in L1, so they are fitted in L1 too, and the wider one can never score worse."""
    beta = torch.linalg.lstsq(feats, target[:, None]).solution
    eps = 1e-6 * target.abs().mean().clamp_min(TINY)
    for _ in range(iters):
        wts = 1 / (target - (feats @ beta)[:, 0]).abs().clamp_min(eps)
        fw = feats * wts[:, None]
        beta = torch.linalg.solve(fw.T @ feats + TINY * torch.eye(feats.shape[1], dtype=feats.dtype), fw.T @ target[:, None])
    return beta


def _oracle_predictions(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two oracles' predictions, fitted in sample (float64)."""
    newest = x[:, -1]
    d = x[:, 1:] - x[:, :-1]
    out = {}
    for name, feats, base in (("oracle-Δ", d, newest), ("oracle", x, torch.zeros_like(newest))):
        beta = _l1_fit(feats, y - base)
        out[name] = base + (feats @ beta)[:, 0]
    return out


def _successive_cosine(traj: np.ndarray) -> float:
    """Mean cosine between u_k = Θk − Θk+1 and u_k+1 over a kind's trajectory [L, N]."""
    u = torch.from_numpy(traj[:-1] - traj[1:]).double()
    cos = torch.nn.functional.cosine_similarity(u[:-1], u[1:], dim=1, eps=TINY)
    return cos.mean().item()


def _add_errors(l1: PooledL1, group: str, windows, knowns: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every predictor's and keep-newest's error on ``windows`` (``known.windows.Windows``) into ``l1``; x, y, rms."""
    x, y, rms = (torch.from_numpy(a).double() for a in (windows.x, windows.y, windows.rms))
    l1.add(group, STEP, x[:, -1], y)
    for name in ("taskvector", "linearfit"):
        step, chunk = predict.stepper(name, x)
        l1.add(group, name, step.step(x, None, chunk), y)
    for name, pred in _oracle_predictions(x, y).items():
        l1.add(group, name, pred, y)
    with torch.inference_mode():
        for label, model in knowns.items():
            step, chunk = predict.stepper(model, x.float())
            l1.add(group, label, step.step(x.float(), rms.float(), chunk).double(), y)
    return x, y, rms


def kind_stats(windows, traj: np.ndarray, knowns: dict, direction=None) -> KindStats:
    """Every number of one kind of one sweep (``windows``, ``direction``: ``known.windows.Windows`` of the
    trajectory as recorded and norm-rescaled)."""
    from known.model import INPUT_MODES, prepare

    st = KindStats(cosine=_successive_cosine(traj))
    x, y, rms = _add_errors(st.l1, RECORDED, windows, knowns)
    st.n = len(y)
    if direction is not None:
        _add_errors(st.l1, DIRECTION, direction, knowns)
    gap = (y - x[:, -1]).abs()
    st.beyond = {mode: (gap / prepare(mode, x, rms)[2] > 1).sum().item() for mode in INPUT_MODES}
    return st


def sweep_stats(sample: Sample, label: str, knowns: dict[str, dict]) -> SweepStats:
    """Every number of one sweep; ``knowns``: name -> {kind: KNOWN}."""
    from known.windows import kind_trajectory, trajectory_windows

    rec = sample.record
    kinds, norms = {}, {}
    for kind in KINDS:
        found = kind_trajectory(sample, kind)
        if found is None:
            continue
        norms[kind] = np.linalg.norm(found[0].astype(np.float64), axis=1).tolist()
        if (w := trajectory_windows(*found)) is not None:
            kinds[kind] = kind_stats(w, found[0], {name: m[kind] for name, m in knowns.items()},
                                     trajectory_windows(*found, direction=True))
    return SweepStats(sample.key, label, rec.family, rec.dataset, rec.learned(),
                      [s.test_acc for s in rec.stages], [s.test_loss for s in rec.stages], kinds, norms)


def collect_stats(roots: dict[str, str], knowns: dict[str, dict], val_fraction: float | None = None) -> list[SweepStats]:
    """Stats of every done sweep under each root (label -> root), with a progress line per sweep; with
    ``val_fraction``, only the sweeps ``known.train`` holds out at that fraction (KNOWNs scored on unseen sweeps)."""
    from tqdm import tqdm

    from known.windows import is_validation

    where = None if val_fraction is None else (lambda row: is_validation(row["sweep_id"], val_fraction))
    out = []
    for label, root in roots.items():
        for sample in tqdm(readers.iter_sweeps(root, where=where), desc=label, unit="sweep", file=sys.stderr,
                           disable=None):
            out.append(sweep_stats(sample, label, knowns))
    return out


def pooled(stats: list[SweepStats], kinds=KINDS) -> KindStats:
    total = KindStats()
    for s in stats:
        for k in kinds:
            if k in s.kinds:
                total.add(s.kinds[k])
    return total


def norm_growth(used: list[SweepStats], kind: str) -> dict[str, float]:
    """How a kind's norm moves along the sweeps (Θ0 → Θlast, the order they were trained in): the mean, least
    and largest relative change, and the fraction of sweeps whose norm grew at every stage."""
    runs = [s.norms[kind] for s in used if len(s.norms.get(kind, [])) > 1 and s.norms[kind][0] > 0]
    if not runs:
        return {}
    change = [n[-1] / n[0] - 1 for n in runs]
    grows = [all(b > a for a, b in zip(n, n[1:])) for n in runs]
    return {"norm_change": _mean(change), "norm_change_min": min(change), "norm_change_max": max(change),
            "norm_grows_every_stage": sum(grows) / len(grows)}


def _mean(values) -> float:
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


def _f(v: float, digits: int = 3) -> str:
    return "—" if v != v else f"{v:.{digits}f}"


def summary(stats: list[SweepStats], knowns: list[str], keep_unlearned: bool = False) -> dict:
    """Nested numbers the tables and MLflow are made from: label -> kind -> metric -> value."""
    by_label: dict[str, list[SweepStats]] = defaultdict(list)
    for s in stats:
        by_label[s.label].append(s)
    out = {}
    for label, group in by_label.items():
        used = [s for s in group if s.learned or keep_unlearned]
        entry = {"sweeps": len(group), "unlearned": len(group) - len(used)}
        for kind in (*KINDS, "all"):
            st = pooled(used, KINDS if kind == "all" else (kind,))
            if not st.n:
                continue
            entry[kind] = {p: st.ratio(p) for p in (*PREDICTORS, *knowns)}
            entry[kind] |= {f"dir:{p}": st.ratio(f"dir:{p}") for p in (*PREDICTORS, *knowns)}
            if kind != "all":
                entry[kind] |= norm_growth(used, kind)
            entry[kind] |= {f"beyond_{m}": v / st.n for m, v in st.beyond.items()}
            entry[kind]["cosine"] = _mean(s.kinds[kind].cosine for s in used if kind in s.kinds) if kind != "all" else float("nan")
            entry[kind]["windows"] = st.n
        accs, losses = [s.test_acc for s in used], [s.test_loss for s in used]
        entry["test_acc"] = [_mean(a[i] for a in accs if i < len(a)) for i in range(max(map(len, accs), default=0))]
        entry["test_loss"] = [_mean(a[i] for a in losses if i < len(a)) for i in range(max(map(len, losses), default=0))]
        entry["forgetting_sweeps"] = sum(a[-1] < a[0] for a in accs)
        entry["used"] = len(used)
        out[label] = entry
    return out


def norm_lines(main: dict, cols: list[str], knowns: list[str]) -> list[str]:
    """The norm-versus-direction table of ``summary``'s numbers."""
    lines = ["", "### Norm versus direction", "",
             "Each kind's L2 norm from Θ0 to the last stage (the order the sweep trained them), and the relative L1 "
             "with every window's stages rescaled to its newest input's per-tensor norms: the direction alone "
             "(keep-newest = 1 again).", "",
             "| protocol | kind | norm Θ0 → Θlast, mean [min, max] | sweeps whose norm grew at every stage | "
             + " | ".join(f"{c}, direction" for c in cols) + " |",
             "|" + "---|" * (4 + len(cols))]
    for label, e in main.items():
        for kind in KINDS:
            if kind not in e or "norm_change" not in e[kind]:
                continue
            m = e[kind]
            vals = " | ".join(_f(m[f"dir:{p}"]) for p in (*PREDICTORS, *knowns))
            lines.append(f"| {label} | {kind} | {m['norm_change']:+.2%} [{m['norm_change_min']:+.2%}, {m['norm_change_max']:+.2%}] | "
                         f"{m['norm_grows_every_stage']:.0%} | {vals} |")
    return lines


def render(stats: list[SweepStats], knowns: list[str], command: str, keep_unlearned: bool = False) -> str:
    """The markdown report: predictability per protocol and kind, forgetting, and the family × dataset grid."""
    from dataclasses import replace

    main = summary(stats, knowns, keep_unlearned)
    cols = ["TaskVector", "LinearFit", "oracle-Δ", "oracle", *knowns]
    lines = [f"Regenerate: `{command}`", "",
             "### Relative L1 of predicting Θk from Θk+1…Θk+5 (pooled over the learned sweeps; keep-newest = 1)", "",
             "| protocol | kind | sweeps (unlearned) | windows | " + " | ".join(cols)
             + " | cos(Δk, Δk+1) | beyond ±1: raw / scaled / rms |",
             "|" + "---|" * (6 + len(cols))]
    for label, e in main.items():
        for kind in (*KINDS, "all"):
            if kind not in e:
                continue
            m = e[kind]
            vals = " | ".join(_f(m[p]) for p in (*PREDICTORS, *knowns))
            beyond = " / ".join(f"{m[f'beyond_{x}']:.1%}" for x in ("raw", "scaled", "rms"))
            lines.append(f"| {label} | {kind} | {e['used']} ({e['unlearned']}) | {m['windows']:,} | {vals} | "
                         f"{_f(m['cosine'], 2)} | {beyond} |")
    lines += norm_lines(main, cols, knowns)
    lines += ["", "### Does forgetting show? Source test accuracy and loss by stage (mean over learned sweeps)", "",
              "| protocol | test acc Θ0 → Θlast (by stage) | test loss Θ0 → Θlast | sweeps whose accuracy fell |", "|---|---|---|---|"]
    for label, e in main.items():
        acc = " → ".join(f"{a:.3f}" for a in e["test_acc"])
        loss = f"{_f(e['test_loss'][0])} → {_f(e['test_loss'][-1])}" if e["test_loss"] else "—"
        lines.append(f"| {label} | {acc} | {loss} | {e['forgetting_sweeps']} of {e['used']} |")
    grid = summary([replace(s, label=f"{s.label} | {s.family} | {s.dataset}") for s in stats], knowns, keep_unlearned)
    lines += ["", "### By family × dataset (conv kernels)", "",
              "| protocol | family | dataset | sweeps (unlearned) | TaskVector | oracle-Δ | oracle | cos | test acc Θ0 → Θlast |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label, e in sorted(grid.items()):
        m = e.get("conv")
        acc = f"{e['test_acc'][0]:.3f} → {e['test_acc'][-1]:.3f}" if e["test_acc"] else "—"
        cells = " | ".join(_f(m[p]) for p in ("taskvector", "oracle-Δ", "oracle")) + f" | {_f(m['cosine'], 2)}" if m else "— | — | — | —"
        lines.append(f"| {label} | {e['used']} ({e['unlearned']}) | {cells} | {acc} |")
    return "\n".join(lines) + "\n"


def log_to_mlflow(numbers: dict, report: str, roots: dict[str, str], tracking: str | None) -> str:
    """One MLflow run with every number as a metric (``<protocol>.<kind>.<predictor>``) and the report."""
    import mlflow

    from meta.tracking import use_tracking

    use_tracking(tracking, "predictability")
    with mlflow.start_run(run_name="predictability") as run:
        mlflow.log_params({f"root.{label}": root for label, root in roots.items()})
        metrics = {f"{label}.{kind}.{name}": v for label, e in numbers.items() for kind in (*KINDS, "all") if kind in e
                   for name, v in e[kind].items() if v == v}
        mlflow.log_metrics({k.replace("Δ", "delta"): float(v) for k, v in metrics.items()})
        mlflow.log_text(report, "predictability.md")
        mlflow.log_text(json.dumps(numbers, indent=1), "predictability.json")
        return run.info.run_id


def _load_knowns(specs: list[str], tracking: str | None) -> dict[str, dict]:
    """name -> models for each ``--known`` (``models:/…`` in the store ``tracking``, a folder, or ``shipped``)."""
    from known import KnownError, registry

    out = {}
    for spec in specs:
        try:
            out[f"KNOWN {spec}"] = registry.load_predictor("known", None if spec == "shipped" else spec, tracking)
        except (KnownError, OSError) as e:  # a bad models:/ URI, a missing file, weights that are not KNOWN's
            raise PredictabilityError(f"--known {spec}: {e}") from e
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(prog="python -m known.predictability", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_collection(p, "roots", nargs="+", required=True,
                       help="collections (folders or URIs), one per protocol (labelled by folder name)")
    p.add_argument("--out", default=None, help="write the markdown report here (default: stdout)")
    p.add_argument("--json", default=None, help="also write the numbers as JSON")
    p.add_argument("--known", nargs="*", default=[], help="KNOWNs to score too: models:/KNOWN@champion, a folder, or 'shipped'")
    p.add_argument("--keep-unlearned", action="store_true", help="count sweeps whose Θ0 never learned too")
    p.add_argument("--val-fraction", type=float, default=None, help="only the sweeps known.train holds out at this "
                   "--val-fraction (to score KNOWNs on sweeps they never saw)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of the report and of --known models:/… (default "
                   "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    args = p.parse_args(argv)
    try:
        if args.val_fraction is not None and not 0 < args.val_fraction < 1:
            raise PredictabilityError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
        for flag, path in (("--out", args.out), ("--json", args.json)):  # before the report, not after it
            if path:
                storage.check_output(path, folder=False, flag=flag)
        roots = {Path(storage.resolve(r)[1].rstrip("/")).name or r: r for r in args.collection}
        if len(roots) != len(args.collection):
            raise PredictabilityError(f"collections {args.collection} do not have distinct folder names (they label "
                                      "the protocols)")
        missing = [r for r in args.collection if not catalog.exists(r) or not catalog.read(r)]
        if missing:
            raise PredictabilityError(f"no catalog with sweeps under {missing}")
        for r in args.collection:  # a truncated or missing shard: named now, not as a traceback after minutes of work
            verify.require_intact(r, catalog.read_table(r, verify.COLUMNS))
        knowns = _load_knowns(args.known, args.tracking_uri)
        stats = collect_stats(roots, knowns, args.val_fraction)
    except OblivionError as e:  # a bad flag, an unreadable collection, a shard whose sha256 is off
        return cli.fail(e)
    command = "python -m known.predictability " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    report = render(stats, list(knowns), command, args.keep_unlearned)
    numbers = summary(stats, list(knowns), args.keep_unlearned)
    for path, text in ((args.out, report), (args.json, json.dumps(numbers, indent=1))):
        if path:
            storage.write_atomic(*storage.resolve(path), text.encode())
    if not args.out:
        print(report)
    if not args.no_mlflow:
        log.info("logged to MLflow run %s", log_to_mlflow(numbers, report, roots, args.tracking_uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())
