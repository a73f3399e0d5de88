"""Does KNOW beat naive transfer? One config, one command, everything logged to MLflow.

    python -m evaluation.transfer --config configs/eval-smoke.yaml
    ray job submit --working-dir . -- python -m evaluation.transfer --config …

1. Pre-train Θ0 on the source task and run its forgetting sweep Θ1…Θ4 (the collector's training code), or
   take Θ0…Θ4 from a collected sweep (``from_catalog``).
2. Build initialisations: naive Θ0, each method's predictions ×1/r … ×1/r^steps, and the controls
   (trajectory average; shrink-and-perturb matched to a predictor's update).
3. Fine-tune each on the downstream task over paired seeds, in parallel Ray tasks: a head-only phase, then
   full fine-tuning with cosine decay.
4. Summarise: mean ± std, paired differences with 95% CIs and p-values, source-task accuracy of every
   initialisation (BN re-estimated), the update decomposition, wall time per phase. One MLflow parent
   run per experiment with a child run per (initialisation, seed); tables and plots on the parent.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from collectors import data, zoo
from collectors.config import ConfigError
from collectors.sweep import StagePlan, evaluate, nested_subsets, train_stages
from evaluation import inits as initmod
from evaluation import plots, stats
from evaluation.config import Task, TransferConfig, load_config
from evaluation.finetune import finetune, task_split
from known.model import S
from known.predict import reestimate_bn, retrodict

EXPERIMENT = "oblivion-transfer"


class FinetuneError(RuntimeError):
    """Fine-tunes that raised; the message lists them (the run is marked failed, nothing is summarised)."""
ROLE_TAG = "oblivion.role"


@dataclass
class Trajectory:
    """Θ0…Θ4 of one pre-trained model and what is needed to rebuild and evaluate it."""

    stages: list[dict[str, torch.Tensor]]
    kinds: dict[str, str]
    family: str
    arch: dict
    task: Task  # the source task (for source-task accuracy)
    r: float
    bn_images: int
    wall: dict[str, float] = field(default_factory=dict)
    source_data: tuple | None = None  # (BN images, test split) of the source task, loaded on first use


def pretrain_and_sweep(cfg: TransferConfig, pseed: int, settings: data.DataSettings) -> Trajectory:
    """Θ0 trained on the source task (cosine-decayed when the config says so), then S−1 fine-tunes on
    nested subsets shrinking by r, with the collector's ``train_stages``."""
    src = cfg.source
    train = task_split(src, settings, True, pseed)
    test = task_split(src, settings, False, 0)
    torch.manual_seed(pseed)
    info = data.DATASETS[src.dataset]
    model = zoo.build(src.family, src.arch, info.channels, len(src.classes))
    kinds = zoo.tensor_kinds(model)
    subsets = nested_subsets(len(train), None, src.r, S, pseed)
    plans = [StagePlan(src.pretrain_epochs, src.pretrain_lr, src.pretrain_cosine)] + [StagePlan(src.stage_epochs, src.stage_lr)] * (S - 1)
    walls: list[float] = []
    metrics, snaps = train_stages(model, train, test, subsets, plans, dataset=src.dataset, optimizer=src.optimizer,
                                  batch_size=src.batch_size, gen=torch.Generator().manual_seed(pseed + 1),
                                  on_stage=lambda m: walls.append(m.wall_s))
    return Trajectory(snaps, kinds, src.family, src.arch, src, src.r, src.bn_images,
                      {"pretrain_s": walls[0], "sweep_s": sum(walls[1:])})


def from_catalog(cfg: TransferConfig) -> Trajectory:
    """Θ0…Θ4 of a collected sweep."""
    from meta import readers

    ref = cfg.from_catalog
    found = list(readers.iter_sweeps(ref.root, where=lambda r: r["sweep_id"] == ref.sweep_id))
    if not found:
        raise ConfigError(f"sweep {ref.sweep_id!r} is not a done sweep of {ref.root}")
    sample = found[0]
    spec = sample.record.spec
    down = cfg.downstream
    if spec["dataset"] == down.dataset:
        raise ConfigError(f"sweep {ref.sweep_id} was trained on every class of {down.dataset}: a downstream task on the "
                          f"same dataset would not be new to it; choose another downstream dataset")
    a, b = data.DATASETS[spec["dataset"]], data.DATASETS[down.dataset]
    if (a.channels, a.size) != (b.channels, b.size):
        raise ConfigError(f"sweep {ref.sweep_id} ({spec['dataset']}) and downstream {down.dataset} images differ in shape")
    if sample.record.n_stages < S:
        raise ConfigError(f"sweep {ref.sweep_id} recorded {sample.record.n_stages} stages; KNOW needs {S}")
    kinds = sample.record.kinds
    stages = [{n: torch.from_numpy(sample.tensors[n][k].copy()) for n in kinds} for k in range(S)]
    walls = [s.wall_s for s in sample.record.stages]
    task = Task(dataset=spec["dataset"], test_size=spec["test_size"])
    return Trajectory(stages, kinds, spec["family"], spec["arch"], task, spec["r"], 2000,
                      {"pretrain_s": walls[0], "sweep_s": sum(walls[1:S])})


def source_accuracy(traj: Trajectory, state: dict, settings: data.DataSettings, bn: bool) -> float:
    """Source-task test accuracy of ``state``; with ``bn`` its BatchNorm statistics are re-estimated first on
    ``bn_images`` source training images (statistics copied from Θ0 no longer match moved weights)."""
    info = data.DATASETS[traj.task.dataset]
    model = zoo.build(traj.family, traj.arch, info.channels, len(traj.task.classes))
    model.load_state_dict(state)
    if traj.source_data is None:  # the PCA plane evaluates ~80 states: select the images once
        traj.source_data = (task_split(traj.task, settings, True, 0).x[: traj.bn_images], task_split(traj.task, settings, False, 0))
    bn_x, test = traj.source_data
    if bn:
        reestimate_bn(model, traj.task.dataset, bn_x)
    return evaluate(model, traj.task.dataset, test)[1]


def build_inits(cfg: TransferConfig, traj: Trajectory, models: dict) -> tuple[dict, list[dict], dict]:
    """init id -> (description, state); the update decomposition rows; prediction seconds per method."""
    r = traj.r
    out = {"naive": ({"method": "naive", "step": 0}, traj.stages[0])}
    if "average" in cfg.controls:
        out["average"] = ({"method": "average", "step": 0}, initmod.average(traj.stages, traj.kinds))
    decomposition, wall = [], {}
    for method in cfg.methods:
        t0 = time.perf_counter()
        preds = retrodict(traj.stages, cfg.steps, method, models=models.get(method), kinds=traj.kinds)
        wall[method] = time.perf_counter() - t0
        for k, pred in enumerate(preds, 1):
            out[f"{method}-{k}"] = ({"method": method, "step": k}, pred)
            decomposition.append({"init": f"{method}-{k}", **initmod.decompose(traj.stages[0], traj.stages[1], pred, traj.kinds)})
            if "shrink-perturb" in cfg.controls and method in cfg.shrink_perturb_for:
                sp = initmod.shrink_perturb(traj.stages[0], pred, traj.kinds, seed=cfg.seed + k)
                out[f"sp-{method}-{k}"] = ({"method": "shrink-perturb", "matches": method, "step": k}, sp)
    for name, (desc, _) in out.items():
        desc["multiplier"] = round((1 / r) ** desc["step"], 4)
    return out, decomposition, wall


def _finetune_job(init, family, arch, task_json, settings, seed):
    from evaluation.config import Downstream

    return finetune(init, family, arch, Downstream.model_validate_json(task_json), settings, seed)


def run_finetunes(jobs: list[tuple], workers: int | None) -> list[dict]:
    """Run every (key, init, family, arch, task, settings, seed) fine-tune as a Ray task, one CPU each."""
    import ray
    from tqdm import tqdm

    remote = ray.remote(num_cpus=1, max_retries=2)(_finetune_job)
    refs, keys, put = [], {}, {}
    limit = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    results, failures = [], []
    pending = list(jobs)
    with tqdm(total=len(jobs), desc="fine-tunes", unit="run") as bar:
        while pending or refs:
            while pending and len(refs) < limit:
                key, init, family, arch, task, settings, seed = pending.pop(0)
                if init is not None and id(init) not in put:
                    put[id(init)] = ray.put(init)
                ref = remote.remote(put[id(init)] if init is not None else None, family, arch, task.model_dump_json(), settings, seed)
                keys[ref] = key
                refs.append(ref)
            done, refs = ray.wait(refs, num_returns=1)
            key = keys.pop(done[0])
            try:
                results.append({**key, **ray.get(done[0])})
            except ray.exceptions.RayError as e:  # recorded, so one bad fine-tune does not hide the others
                failures.append(f"{key}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
            bar.update(1)
    if failures:
        raise FinetuneError(f"{len(failures)} of {len(jobs)} fine-tunes failed:\n  " + "\n  ".join(failures[:10]))
    return results


def summarize(results: list[dict], inits: dict, source_acc: dict) -> tuple[list[dict], list[dict]]:
    """Per-initialisation rows and paired comparisons of every KNOW initialisation to naive, to TaskVector
    and to its shrink-and-perturb control at the same step. Pairs are (pre-training seed, downstream seed).

    Two corrections keep the evidence honest: ``p_holm`` is Holm-adjusted over all KNOW comparisons of the
    experiment (a dozen tests give a p < 0.05 by chance often), and with several pre-training seeds
    ``p_pretrain`` tests with the pre-training seed as the unit (downstream seeds under one pre-trained
    model are not independent draws of a pre-trained model, so the pooled p is optimistic)."""
    by = {}
    for r in results:
        by.setdefault(r["init"], {})[(r["pretrain_seed"], r["seed"])] = r
    order = [i for i in ["scratch", *inits] if i in by]
    pairs = sorted(by["naive"])
    clusters = [p[0] for p in pairs]
    several = len(set(clusters)) > 1

    def vals(init, phase):
        return [by[init][p][f"acc_{phase}"] for p in pairs]

    def compare(init, ref, phase) -> dict:
        a, b = vals(init, phase), vals(ref, phase)
        p = stats.paired(a, b)
        out = {"d": p.mean, "ci_low": p.ci_low, "ci_high": p.ci_high, "p": p.p, "n": p.n, "wins": p.wins}
        if several:
            out["p_pretrain"] = stats.clustered(a, b, clusters).p
        return out

    rows = []
    for init in order:
        desc = inits[init][0] if init in inits else {"method": "scratch", "step": 0, "multiplier": 0}
        row = {"init": init, "method": desc["method"], "step": desc["step"], "multiplier": desc["multiplier"],
               "n": len(pairs), "source_acc": source_acc.get(init, float("nan"))}
        for phase in ("head", "full"):
            row[f"{phase}_mean"], row[f"{phase}_std"] = stats.mean_std(vals(init, phase))
            if init != "naive":
                c = compare(init, "naive", phase)
                row.update({f"{phase}_d_naive": c["d"], f"{phase}_ci_low": c["ci_low"], f"{phase}_ci_high": c["ci_high"], f"{phase}_p": c["p"]})
                if several:
                    row[f"{phase}_p_pretrain"] = c["p_pretrain"]
        rows.append(row)
    comparisons = []
    for init in order:
        desc = inits.get(init, ({},))[0]
        if not str(desc.get("method", "")).startswith("known"):
            continue
        refs = ["naive", f"taskvector-{desc['step']}", f"sp-{desc['method']}-{desc['step']}"]
        for ref in [r for r in refs if r in by]:
            for phase in ("head", "full"):
                comparisons.append({"init": init, "method": desc["method"], "reference": ref, "phase": phase,
                                    **compare(init, ref, phase)})
    for c, adj in zip(comparisons, stats.holm([c["p"] for c in comparisons])):
        c["p_holm"] = adj
    return rows, comparisons


def markdown(cfg: TransferConfig, rows, comparisons, decomposition, curves, wall, verdicts) -> str:
    pct = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"  # noqa: E731
    lines = [f"### {cfg.name}", "", *[f"- {v}" for v in verdicts], "",
             "| init | ×data | source acc (BN re-est.) | head-only acc | Δ vs naive [95% CI] | full FT acc | Δ vs naive [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["init"], f"{r['multiplier']:g}" if r["method"] != "scratch" else "–", pct(r["source_acc"])]
        for phase in ("head", "full"):
            cells.append(f"{pct(r[f'{phase}_mean'])} ± {pct(r[f'{phase}_std'])}")
            cells.append("–" if r["init"] == "naive" else
                         f"{100 * r[f'{phase}_d_naive']:+.2f} [{100 * r[f'{phase}_ci_low']:+.2f}, {100 * r[f'{phase}_ci_high']:+.2f}] p={r[f'{phase}_p']:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    if comparisons:
        several = "p_pretrain" in comparisons[0]
        lines += ["", f"KNOW comparisons ({len(comparisons)} tests; Holm-adjusted p over all of them"
                  + ("; p with pre-training seeds as the unit" if several else "") + "):", "",
                  "| KNOW init | vs | phase | Δ acc (points) [95% CI] | p | p Holm |" + (" p pre-train seeds |" if several else "") + " wins/n |",
                  "|---|---|---|---|---|---|" + ("---|" if several else "") + "---|"]
        for c in comparisons:
            lines.append(f"| {c['init']} | {c['reference']} | {c['phase']} | {100 * c['d']:+.2f} [{100 * c['ci_low']:+.2f}, "
                         f"{100 * c['ci_high']:+.2f}] | {c['p']:.3g} | {c['p_holm']:.3g} |"
                         + (f" {c['p_pretrain']:.3g} |" if several else "") + f" {c['wins']}/{c['n']} |")
    if decomposition:
        lines += ["", "Update decomposition u = Θ̂ − Θ0 (pre-training seed 1st): λ = fitted shrink (1 = none), R² of "
                  "u ≈ (λ−1)Θ0, and of u ≈ (λ−1)Θ0 + β(Θ0−Θ1); ‖u‖/‖Θ0‖.", "",
                  "| init | λ | R² shrink | R² shrink + direction | ‖u‖/‖Θ0‖ |", "|---|---|---|---|---|"]
        for d in decomposition:
            lines.append(f"| {d['init']} | {d['lambda']:.4f} | {d['r2_shrink']:.3f} | {d['r2_shrink_dir']:.3f} | {d['update_rel']:.4f} |")
    lines += ["", "Source-task accuracy by stage (Θ0 … Θ4), BN statistics re-estimated / kept:", ""]
    for seed, c in curves.items():
        lines.append(f"- pre-training seed {seed}: " + " ".join(pct(a) for a in c["bn_reestimated"]) +
                     " / " + " ".join(pct(a) for a in c["bn_kept"]))
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in wall.items())]
    return "\n".join(lines) + "\n"


def verdicts(rows, comparisons, curves, test_n: int) -> list[str]:
    """Plain-language conclusions the numbers support (and nothing more)."""
    out = []
    by = {r["init"]: r for r in rows}
    for phase, label in (("head", "head-only phase"), ("full", "full fine-tuning")):
        if "scratch" not in by:
            break
        s = by["scratch"]
        d, lo, p = -s[f"{phase}_d_naive"], -s[f"{phase}_ci_high"], s[f"{phase}_p"]
        clear = lo > 0 and p < 0.05
        out.append(f"pre-training vs scratch ({label}): {100 * d:+.2f} points (CI low {100 * lo:+.2f}, p={p:.3g}) — "
                   + ("pre-training helps clearly." if clear else "pre-training does NOT beat scratch clearly: this phase cannot show anything."))
    for seed, c in curves.items():
        a0, a4 = c["bn_reestimated"][0], c["bn_reestimated"][-1]
        se = math.sqrt(max(a0 * (1 - a0) + a4 * (1 - a4), 1e-12) / test_n)
        out.append(f"forgetting (seed {seed}): source accuracy Θ0 {100 * a0:.2f} → Θ4 {100 * a4:.2f} ({100 * (a0 - a4):+.2f} points, "
                   f"2·SE {200 * se:.2f}) — " + ("forgetting shows." if a0 - a4 > 2 * se else "no clear forgetting."))
    for phase, label in (("head", "the head-only phase"), ("full", "full fine-tuning")):
        wins = [c for c in comparisons if c["reference"] == "naive" and c["phase"] == phase and c["d"] > 0 and c["p"] < 0.05]
        for win in wins:
            others = [c for c in comparisons if c["init"] == win["init"] and c["phase"] == phase and c["reference"] != "naive"]
            vs = "; ".join(f"vs {c['reference']} {100 * c['d']:+.2f} (p={c['p']:.3g})" for c in others)
            ok = bool(others) and all(c["d"] > 0 and c["p"] < 0.05 for c in others)
            out.append(f"{win['init']} beats naive after {label} ({100 * win['d']:+.2f}, p={win['p']:.3g}, Holm {win['p_holm']:.3g}"
                       + (f", over pre-training seeds p={win['p_pretrain']:.3g}" if "p_pretrain" in win else "") + ")"
                       + (f"; {vs}" if vs else "") + (" — beats every control at its step." if ok else " — but not every control at its step."))
        if not wins:
            out.append(f"no KNOW initialisation beats naive transfer with p < 0.05 after {label}.")
    out.append(target(comparisons))
    return out


def target_hits(ours, key: str) -> list[str]:
    """Issue 4's bar: where our KNOWN beats naive and TaskVector at the same step and phase with ``key``
    (p, p_holm or p_pretrain) < 0.05. ``ours``: the comparisons of our KNOWN only (``target_results``)."""
    hits = []
    for c in ours:
        if c["reference"] == "naive" and c["d"] > 0 and c[key] < 0.05:
            tv = [t for t in ours if t["init"] == c["init"] and t["phase"] == c["phase"] and t["reference"].startswith("taskvector")]
            if tv and all(t["d"] > 0 and t[key] < 0.05 for t in tv):
                hits.append(f"{c['init']} {c['phase']}")
    return hits


def target_results(comparisons) -> dict[str, list[str]] | None:
    """``target_hits`` under each test the experiment has (raw p, Holm, and the pre-training seed as the unit
    where there are several); None when our KNOWN was not evaluated. "Ours" is method ``known``: the authors'
    ``known-official`` does not count."""
    ours = [c for c in comparisons if c["method"] == "known"]
    if not ours:
        return None
    return {key: target_hits(ours, key) for key in ["p", "p_holm"] + (["p_pretrain"] if "p_pretrain" in ours[0] else [])}


def target(comparisons) -> str:
    res = target_results(comparisons)
    if res is None:
        return "target (our KNOWN beats naive and TaskVector, p < 0.05): not measured (no `known` method in this config)."
    labels = {"p": "", "p_holm": "after Holm adjustment: ", "p_pretrain": "with pre-training seeds as the unit: "}
    return "target (our KNOWN beats naive and TaskVector, p < 0.05): " + "; ".join(
        labels[key] + (", ".join(hits) or "not met") for key, hits in res.items()) + "."


def load_predictors(cfg: TransferConfig, tracking: str | None) -> dict:
    from known import registry

    sources = {"known": cfg.known, "known-official": cfg.known_official}
    return {m: registry.load_predictor(m, sources[m], tracking) for m in ("known", "known-official") if m in cfg.methods}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluation.transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (see configs/eval-smoke.yaml)")
    p.add_argument("--data-root", default=None, help=f"datasets in torchvision's layout (default ${data.ENV_ROOT})")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment name")
    p.add_argument("--workers", type=int, default=None, help="parallel fine-tunes (default: config, else cluster CPUs)")
    p.add_argument("--unverified-cifar10", action="store_true", help="accept a locally rebuilt CIFAR-10 (e.g. ../shared/data)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # everything checkable is checked before any training
        cfg = load_config(args.config)
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        settings = data.DataSettings(data.resolve_root(args.data_root), False, args.unverified_cifar10 or cfg.unverified_cifar10)
        needed = {cfg.downstream.dataset} | ({cfg.source.dataset} if cfg.source else set())
        data.check_available(sorted(needed), settings)
        task_split(cfg.downstream, settings, True, 0)  # enough images for the asked train_size?
        if cfg.source:
            task_split(cfg.source, settings, True, 0)
        models = load_predictors(cfg, args.tracking_uri)
        reused = from_catalog(cfg) if cfg.from_catalog else None  # a missing sweep is an error up front
    except (ConfigError, data.DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import mlflow
    import ray
    from mlflow.entities import Metric

    from known import registry

    if not ray.is_initialized():
        ray.init()
    uri = registry.use_tracking(args.tracking_uri, args.experiment)
    workers = args.workers or cfg.workers
    seeds = [cfg.seed + i for i in range(cfg.downstream.seeds)]
    with mlflow.start_run(run_name=cfg.name, tags={ROLE_TAG: "experiment"}) as parent:
        mlflow.log_text(Path(args.config).read_text(), "config.yaml")
        mlflow.log_params({"config_name": cfg.name, "methods": ",".join(cfg.methods), "steps": cfg.steps,
                           "downstream": f"{cfg.downstream.dataset}{cfg.downstream.classes}", "downstream_train_size": cfg.downstream.train_size,
                           "seeds": cfg.downstream.seeds, "pretrain_seeds": ",".join(map(str, cfg.pretrain_seeds)),
                           "source": f"{cfg.source.dataset}{cfg.source.classes}" if cfg.source else f"catalog:{cfg.from_catalog.sweep_id}"})
        wall: dict[str, float] = {}
        jobs, inits_all, source_acc, curves, decomposition = [], {}, {}, {}, []
        trajs = {}
        for pseed in cfg.pretrain_seeds if cfg.source else [0]:
            print(f"pre-training seed {pseed}: Θ0 and its forgetting sweep …", flush=True)
            traj = pretrain_and_sweep(cfg, pseed, settings) if cfg.source else reused
            trajs[pseed] = traj
            for k, v in traj.wall.items():
                wall[k] = wall.get(k, 0.0) + v
            curves[pseed] = {"bn_reestimated": [source_accuracy(traj, s, settings, True) for s in traj.stages],
                             "bn_kept": [source_accuracy(traj, s, settings, False) for s in traj.stages]}
            for k, a in enumerate(curves[pseed]["bn_reestimated"]):
                mlflow.log_metric(f"source_acc_seed{pseed}", a, step=k)
            inits, dec, pwall = build_inits(cfg, traj, models)
            for m, s in pwall.items():
                wall[f"predict_{m}_s"] = wall.get(f"predict_{m}_s", 0.0) + s
            if not decomposition:
                decomposition = dec
            inits_all.update({k: v for k, v in inits.items() if k not in inits_all})
            for name, (_, state) in inits.items():
                source_acc.setdefault(name, []).append(source_accuracy(traj, state, settings, True))
            for name, (desc, state) in ([("scratch", ({}, None))] if cfg.scratch else []) + list(inits.items()):
                for seed in seeds:
                    jobs.append(({"init": name, "pretrain_seed": pseed, "seed": seed}, state, traj.family, traj.arch,
                                 cfg.downstream, settings, seed))
        source_acc = {k: sum(v) / len(v) for k, v in source_acc.items()}
        t0 = time.perf_counter()
        try:
            results = run_finetunes(jobs, workers)
        except FinetuneError as e:
            print(f"error: {e}", file=sys.stderr)
            mlflow.set_tag("oblivion.error", str(e)[:4000])
            mlflow.end_run("FAILED")
            return 1
        wall["finetune_s"] = time.perf_counter() - t0
        wall["finetune_per_run_s"] = sum(r["wall_s"] for r in results) / len(results)

        for r in sorted(results, key=lambda r: (r["init"], r["pretrain_seed"], r["seed"])):
            desc = inits_all.get(r["init"], ({"method": "scratch", "step": 0, "multiplier": 0},))[0]
            with mlflow.start_run(run_name=f"{r['init']} p{r['pretrain_seed']} s{r['seed']}", nested=True,
                                  tags={ROLE_TAG: "finetune"}):
                mlflow.log_params({**{k: str(v) for k, v in desc.items()}, "init": r["init"],
                                   "pretrain_seed": r["pretrain_seed"], "seed": r["seed"]})
                mlflow.log_metrics({"acc_head": r["acc_head"], "acc_full": r["acc_full"], "wall_s": r["wall_s"]})
                now = int(time.time() * 1000)
                series = [Metric(k, v, now, i + 1) for k in ("head_train_loss", "head_train_acc", "full_train_loss", "full_train_acc")
                          for i, v in enumerate(r[k])]
                mlflow.tracking.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=series)

        rows, comparisons = summarize(results, inits_all, source_acc)
        test_n = len(task_split(trajs[next(iter(trajs))].task, settings, False, 0))
        verdict = verdicts(rows, comparisons, curves, test_n)
        if "known" in cfg.methods or "known-official" in cfg.methods:
            know = min((s for k, s in wall.items() if k.startswith("predict_known")), default=0.0)
            wall["know_extra_over_naive"] = (wall["sweep_s"] + know) / max(wall["pretrain_s"], 1e-9)
        md = markdown(cfg, rows, comparisons, decomposition, curves, wall, verdict)
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
            (d / "summary.csv").write_text(buf.getvalue())
            (d / "summary.md").write_text(md)
            (d / "summary.json").write_text(json.dumps({"rows": rows, "comparisons": comparisons, "decomposition": decomposition,
                                                         "curves": {str(k): v for k, v in curves.items()}, "wall": wall,
                                                         "verdicts": verdict}, indent=1))
            plots.accuracy(rows, d / "accuracy.png")
            plots.forgetting(curves, d / "forgetting_curve.png")
            first = trajs[next(iter(trajs))]
            shown = {k: inits_all[k][1] for k in inits_all if k.endswith("-1") and not k.startswith("sp-")}
            shown |= {k: inits_all[k][1] for k in ("known-3", "average") if k in inits_all}
            _, off = plots.pca_plane(first.stages, shown, initmod.predicted_names(first.kinds),
                                     lambda st: source_accuracy(first, st, settings, True), d / "pca_plane.png")
            mlflow.log_metrics({f"{k}.pca_off_plane": v for k, v in off.items()})
            mlflow.log_artifacts(str(d))
        mlflow.log_metrics({k: v for k, v in wall.items()})
        for r in rows:
            mlflow.log_metrics({f"{r['init']}.{k}": v for k, v in r.items()
                                if isinstance(v, float) and not math.isnan(v) and k != "multiplier"})
        print(md)
        print(f"MLflow run {parent.info.run_id} in experiment {args.experiment!r} at {uri}; "
              f"`mlflow ui --backend-store-uri {uri}` to browse it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
