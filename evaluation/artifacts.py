"""What an experiment leaves on its parent MLflow run: the summary (``evaluation.summary``: paired CIs, Holm,
oracle gaps and the fraction of them closed, the learning-rate selection), tables as CSV / markdown / JSON,
plots, and the headline numbers as metrics."""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from collectors import data
from evaluation import inits as initmod
from evaluation import plots, summary
from evaluation.config import TransferConfig
from evaluation.finetune import task_split
from evaluation.trajectories import Trajectory, source_accuracy


@dataclass
class Extras:
    """What the experiment measured beside the fine-tunes (``evaluation.transfer.describe`` and ``main``)."""

    source_acc: dict[str, float]  # init -> source-task accuracy (BN re-estimated), mean over pre-trained models
    curves: dict[int, dict[str, list[float]]]  # pre-training seed -> the forgetting curve, BN re-estimated / kept
    decomposition: list[dict]  # each prediction's update as a shrink plus a step (first pre-trained model)
    wall: dict[str, float]  # seconds per phase
    protocol: dict | None = None  # the evaluation sweep's protocol
    protocol_note: str | None = None  # how it compares with the KNOWN's meta-training protocol
    first_states: dict = field(default_factory=dict)  # init -> weights of the first pre-trained model (PCA plot)


@dataclass
class Summary:
    rows: list[dict]
    comparisons: list[dict]
    gaps: list[dict]
    verdicts: list[str]
    tuning: list[dict] | None
    markdown: str

    def as_json(self, extras: Extras) -> str:
        tuning = [{**t, "val": {f"{f:g}": v for f, v in t["val"].items()}, "test": {f"{f:g}": v for f, v in t["test"].items()}}
                  for t in self.tuning or []]
        return json.dumps({"rows": self.rows, "comparisons": self.comparisons, "gaps": self.gaps,
                           "decomposition": extras.decomposition, "protocol": extras.protocol,
                           "curves": {str(k): v for k, v in extras.curves.items()}, "wall": extras.wall,
                           "verdicts": self.verdicts, "tuning": tuning}, indent=1)


def summarise(cfg: TransferConfig, results: list[dict], descs: dict, extras: Extras, test_n: int) -> Summary:
    """Every table and verdict of ``results``; a tuned experiment's at each initialisation's selected rate."""
    results, tuning = summary.select_rates(results) if cfg.tuning else (results, None)
    rows, comparisons = summary.summarize(results, descs, extras.source_acc)
    gaps = summary.oracle_gaps(results, descs)
    verdicts = summary.verdicts(rows, comparisons, extras.curves, test_n, gaps, tuned=tuning is not None)
    if extras.protocol_note:
        verdicts.insert(0, extras.protocol_note)
    md = summary.markdown(cfg.name, rows, comparisons, gaps, extras.decomposition, extras.curves, extras.wall, verdicts,
                          extras.protocol, tuning)
    return Summary(rows, comparisons, gaps, verdicts, tuning, md)


def _files(s: Summary, extras: Extras, first: Trajectory, settings: data.DataSettings, d: Path) -> dict[str, float]:
    """The tables and plots into ``d``; returns each shown prediction's distance off the trajectory's PCA plane."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=sorted({k for r in s.rows for k in r}))
    writer.writeheader()
    writer.writerows(s.rows)
    (d / "summary.csv").write_text(buf.getvalue())
    (d / "summary.md").write_text(s.markdown)
    (d / "summary.json").write_text(s.as_json(extras))
    if s.tuning:
        plots.lr_curves(s.tuning, d / "lr_grid.png")
    plots.accuracy(s.rows, d / "accuracy.png")
    plots.forgetting(extras.curves, d / "forgetting_curve.png")
    shown = {k: st for k, st in extras.first_states.items()
             if (k.endswith("-1") and not k.startswith(("sp-", "shrink-", "scaled-"))) or k in ("known-3", "average", "oracle-x2")}
    _, off = plots.pca_plane(first.stages, shown, initmod.predicted_names(first.kinds),
                             lambda st: source_accuracy(first, st, settings, True), d / "pca_plane.png")
    return off


def write_artifacts(cfg: TransferConfig, results: list[dict], descs: dict, trajs: dict[int, Trajectory], extras: Extras,
                    settings: data.DataSettings) -> str:
    """Summarise ``results`` and log the tables, JSON and plots on the active (parent) run; returns the markdown."""
    import mlflow

    first = trajs[next(iter(trajs))]
    s = summarise(cfg, results, descs, extras, len(task_split(first.task, settings, False, 0)))
    with tempfile.TemporaryDirectory() as d:
        off = _files(s, extras, first, settings, Path(d))
        mlflow.log_metrics({f"{k}.pca_off_plane": v for k, v in off.items()})
        mlflow.log_artifacts(d)
    mlflow.log_metrics(dict(extras.wall))
    for r in s.rows:
        mlflow.log_metrics({f"{r['init']}.{k}": v for k, v in r.items() if isinstance(v, float) and not math.isnan(v) and k != "multiplier"})
    for g in s.gaps:
        mlflow.log_metric(f"{g['oracle']}.{g['phase']}_gap", g["gap"])
    return s.markdown
