"""Does KNOW beat naive transfer, and how much could it? One config, one command, everything in MLflow.

    python -m evaluation.transfer --config configs/eval-smoke.yaml
    ray job submit --working-dir . -- python -m evaluation.transfer --config …

Read ``main`` top to bottom; each step is one function:

1. ``prepare_trajectories``: per pre-training seed, Θ0 on D0 and its forgetting sweep Θ1…Θ4 (the protocol of
   the config, which should be the one the KNOWN under test was meta-trained on: ``protocol_check``), and the
   oracles, Θ0's recipe on supersets of D0 ×2, ×4 — all as parallel Ray tasks, kept as artifacts of the parent
   run; or Θ0…Θ4 from a collected sweep (``from_catalog``).
2. ``build_inits``: naive Θ0, each method's predictions ×1/r … ×1/r^steps, the oracles, and the controls that
   say where a gain comes from (trajectory average; shrink-and-perturb and a pure shrink fitted to a
   predictor's update; a fixed 0.8^k shrink; naive with BN statistics reset; naive at 1.5× / 2× the lr).
3. ``plan_jobs`` / ``run_finetunes``: every (initialisation, pre-training seed, seed) fine-tune not already
   finished, as Ray tasks; each is logged as a child run the moment it finishes (``evaluation.tracking``),
   so a killed experiment loses only the fine-tunes in flight and the same command continues it.
4. ``write_artifacts``: the summary (``evaluation.summary``: paired CIs, Holm, oracle gap and the fraction
   of it closed), tables and plots on the parent run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from collectors import data, zoo
from collectors.config import ConfigError
from collectors.sweep import Protocol, StagePlan, evaluate, nested_subsets, train_stages
from evaluation import inits as initmod
from evaluation import plots, summary, tracking
from evaluation.config import Downstream, Source, Task, TransferConfig, load_config, protocol_diff
from evaluation.finetune import task_split
from known.model import S
from known.predict import reestimate_bn, retrodict
from meta import cli
from meta.errors import OblivionError
from meta.tracking import tracking_uri, use_tracking

log = logging.getLogger(__name__)
EXPERIMENT, ROLE_TAG = summary.EXPERIMENT, summary.ROLE_TAG


class FinetuneError(RuntimeError):
    """Fine-tunes that raised; the message lists them (the run is marked failed, nothing is summarised)."""


@dataclass
class Trajectory:
    """Θ0…Θ4 of one pre-trained model, its oracles (×m data -> Θ0's recipe on it), and what is needed to
    rebuild and evaluate them."""

    stages: list[dict[str, torch.Tensor]]
    kinds: dict[str, str]
    family: str
    arch: dict
    task: Task  # the source task (for source-task accuracy)
    r: float
    bn_images: int
    wall: dict[str, float] = field(default_factory=dict)
    oracles: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    source_data: tuple | None = None  # (BN images, test split) of the source task, loaded on first use
    converged: dict[str, torch.Tensor] | None = None  # Θ0's recipe on D0 for ``converged_epochs``


@dataclass
class Init:
    """One initialisation to fine-tune from: its description (logged with every child run), its weights
    (None: from scratch), and what its fine-tune changes (the bn-reset and lr controls)."""

    desc: dict
    state: dict[str, torch.Tensor] | None
    finetune: dict = field(default_factory=dict)


# -- 1. trajectories ---------------------------------------------------------------------------------------

def pretrain(src: Source, pseed: int, settings: data.DataSettings, multiplier: int,
             path: str = "reference", epochs: int | None = None) -> tuple[list[dict], list[float]]:
    """Θ0 on D0 (× ``multiplier``: an oracle) with the config's recipe; for D0 itself also the S−1 sweep
    stages on nested subsets shrinking by r, unless ``epochs`` asks for Θ0 alone trained that long (the
    "converged" control). The same seed gives D0, its oracles and its longer training the same initial
    weights and a superset of the same images. Returns the snapshots and the seconds per stage."""
    train = task_split(src, settings, True, pseed, multiplier)
    test = task_split(src, settings, False, 0)
    torch.manual_seed(pseed)
    info = data.DATASETS[src.dataset]
    model = zoo.build(src.family, src.arch, info.channels, len(src.classes))
    n_stages = S if multiplier == 1 and epochs is None else 1
    subsets = nested_subsets(len(train), None, src.r, n_stages, pseed)
    plans = [StagePlan(epochs or src.pretrain_epochs, src.pretrain_lr, src.pretrain_cosine)]
    plans += [StagePlan(src.stage_epochs, src.stage_lr, src.stage_cosine)] * (n_stages - 1)
    protocol = Protocol.of(src, pseed)
    walls: list[float] = []
    _, snaps = train_stages(model, train, test, subsets, plans, dataset=src.dataset, optimizer=src.optimizer,
                            batch_size=src.batch_size, gen=torch.Generator().manual_seed(pseed + 1),
                            on_stage=lambda m: walls.append(m.wall_s), protocol=protocol, path=path)
    return snaps, walls


def _pretrain_job(src_json: str, pseed: int, settings: data.DataSettings, multiplier: int, path: str,
                  epochs: int | None = None):
    import torch  # imported here: run as ``python -m``, this module is __main__ and Ray would pickle its globals

    from evaluation.config import Source
    from evaluation.transfer import pretrain

    torch.set_num_threads(1)
    return pretrain(Source.model_validate_json(src_json), pseed, settings, multiplier, path, epochs)


def _trajectory(cfg: TransferConfig, snaps: list[dict], walls: list[float], oracles: dict, oracle_s: float,
                converged: dict | None = None) -> Trajectory:
    src = cfg.source
    info = data.DATASETS[src.dataset]
    kinds = zoo.tensor_kinds(zoo.build(src.family, src.arch, info.channels, len(src.classes)))
    return Trajectory(snaps, kinds, src.family, src.arch, src, src.r, src.bn_images,
                      {"pretrain_s": walls[0], "sweep_s": sum(walls[1:]), "oracle_pretrain_s": oracle_s}, oracles,
                      converged=converged)


def prepare_trajectories(cfg: TransferConfig, settings: data.DataSettings, run_id: str) -> dict[int, Trajectory]:
    """Every pre-training seed's trajectory and oracles: from the parent run's artifacts where an earlier,
    killed run of this config left them, else trained now (one Ray task per model) and stored there."""
    import ray
    from tqdm import tqdm

    cached = {p: t for p in cfg.pretrain_seeds if (t := load_trajectory(cfg, run_id, p)) is not None}
    remote = ray.remote(num_cpus=1, max_retries=1)(_pretrain_job)
    extra = ["converged"] if "converged" in cfg.controls else []
    todo = {(p, m): remote.remote(cfg.source.model_dump_json(), p, settings, 1 if m == "converged" else m, cfg.path,
                                  cfg.source.converged_epochs if m == "converged" else None)
            for p in cfg.pretrain_seeds if p not in cached for m in [1, *cfg.source.oracles, *extra]}
    got = {}
    with tqdm(total=len(todo), desc="pre-training (Θ0 + sweep, oracles)", unit="model") as bar:
        pending = dict(zip(todo.values(), todo.keys()))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            got[pending.pop(done[0])] = ray.get(done[0])
            bar.update(1)
    for p in cfg.pretrain_seeds:
        if p in cached:
            continue
        snaps, walls = got[(p, 1)]
        oracles = {m: got[(p, m)][0][0] for m in cfg.source.oracles}
        cached[p] = _trajectory(cfg, snaps, walls, oracles, sum(got[(p, m)][1][0] for m in cfg.source.oracles),
                                got[(p, "converged")][0][0] if extra else None)
        save_trajectory(cached[p], run_id, p)
    return cached


def save_trajectory(traj: Trajectory, run_id: str, pseed: int) -> None:
    """Θ0…Θ4 and the oracles as safetensors artifacts of the parent run; ``wall.json`` is written last and
    marks the set complete."""
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        for k, st in enumerate(traj.stages):
            safetensors.torch.save_file({n: t.contiguous() for n, t in st.items()}, f"{d}/stage{k}.safetensors")
        for m, st in traj.oracles.items():
            safetensors.torch.save_file({n: t.contiguous() for n, t in st.items()}, f"{d}/oracle_x{m}.safetensors")
        if traj.converged is not None:
            safetensors.torch.save_file({n: t.contiguous() for n, t in traj.converged.items()}, f"{d}/converged.safetensors")
        mlflow.log_artifacts(d, artifact_path=f"trajectories/p{pseed}")
        Path(d, "wall.json").write_text(json.dumps(traj.wall))
        mlflow.log_artifact(f"{d}/wall.json", artifact_path=f"trajectories/p{pseed}")


def load_trajectory(cfg: TransferConfig, run_id: str, pseed: int) -> Trajectory | None:
    import mlflow

    path = f"trajectories/p{pseed}"
    names = {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run_id, path)}
    if "wall.json" not in names:
        return None
    with tempfile.TemporaryDirectory() as d:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=d))
        snaps = [safetensors.torch.load_file(str(local / f"stage{k}.safetensors")) for k in range(S)]
        oracles = {m: safetensors.torch.load_file(str(local / f"oracle_x{m}.safetensors")) for m in cfg.source.oracles}
        converged = safetensors.torch.load_file(str(local / "converged.safetensors")) if "converged" in cfg.controls else None
        wall = json.loads((local / "wall.json").read_text())
    log.info("pre-training seed %d: trajectory and oracles from the parent run's artifacts", pseed)
    return _trajectory(cfg, snaps, [wall["pretrain_s"], wall["sweep_s"]], oracles, wall.get("oracle_pretrain_s", 0.0),
                       converged)


def protocol_check(cfg: TransferConfig) -> tuple[dict | None, str | None]:
    """The evaluation sweep's protocol and, where the config tests a KNOWN whose meta-training protocol is
    recorded (the shipped one's ``PROVENANCE.json``, or a folder's), a line naming every field that differs."""
    if cfg.source is None:
        return None, None
    ours = cfg.source.protocol()
    if "known" not in cfg.methods:
        return ours, None
    from known import registry

    prov = (Path(cfg.known) if cfg.known and not cfg.known.startswith("models:/") else registry.SHIPPED) / "PROVENANCE.json"
    theirs = json.loads(prov.read_text()).get("protocol") if prov.is_file() else None
    if theirs is None:
        return ours, f"protocol: the KNOWN under test records no meta-training protocol; this evaluation sweeps with {ours}."
    diff, unknown = protocol_diff(ours, theirs)
    tail = f" The KNOWN's provenance does not record {', '.join(unknown)}." if unknown else ""
    if not diff:
        return ours, ("protocol: the evaluation sweep follows the KNOWN's meta-training protocol ("
                      + ", ".join(f"{k} {v}" for k, v in ours.items()) + ")." + tail)
    return ours, ("protocol MISMATCH: the KNOWN was meta-trained on other sweeps than it is tested on here — "
                  + "; ".join(f"{k}: here {a}, meta-training {b}" for k, (a, b) in diff.items()) + "." + tail)


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

# -- 2. initialisations -----------------------------------------------------------------------------------

def naive_controls(cfg: TransferConfig, traj: Trajectory, fresh: dict) -> dict[str, Init]:
    """naive Θ0, the oracles, and the controls that change Θ0 without a predictor: the trajectory average, BN
    statistics reset or BN at its initial values, larger fine-tuning rates, a fixed shrink, the last stage
    Θ_{S−1}, and Θ0's recipe trained to convergence."""
    r, theta0 = traj.r, traj.stages[0]
    out = {"naive": Init({"method": "naive", "step": 0}, theta0)}
    for m, state in traj.oracles.items():
        out[f"oracle-x{m}"] = Init({"method": "oracle", "step": round(math.log(m) / math.log(1 / r), 3), "multiplier": m}, state)
    if "average" in cfg.controls:
        out["average"] = Init({"method": "average", "step": 0}, initmod.average(traj.stages, traj.kinds))
    if "bn-reset" in cfg.controls:
        out["naive-bnreset"] = Init({"method": "bn-reset", "step": 0}, theta0, {"bn": "reset"})
    if "bn-init" in cfg.controls:
        out["naive-bninit"] = Init({"method": "bn-init", "step": 0}, initmod.bn_at_init(theta0, fresh, traj.kinds))
    if "lr" in cfg.controls:
        for f in cfg.lr_factors:
            out[f"naive-lr{f:g}"] = Init({"method": "lr", "lr_factor": f, "step": 0}, theta0, {"full_lr": cfg.downstream.full_lr * f})
    if "shrink-fixed" in cfg.controls:
        for k in range(1, cfg.steps + 1):
            lam = cfg.shrink_fixed ** k
            out[f"scaled-{k}"] = Init({"method": "scaled", "lambda": round(lam, 6), "step": k}, initmod.scaled(theta0, traj.kinds, lam))
    if "last" in cfg.controls:
        out["naive-last"] = Init({"method": "last", "step": 0, "multiplier": round(r ** (len(traj.stages) - 1), 4)}, traj.stages[-1])
    if "converged" in cfg.controls:
        out["naive-converged"] = Init({"method": "converged", "step": 0, "multiplier": 1}, traj.converged)
    return out


def predicted(cfg: TransferConfig, traj: Trajectory, models: dict, fresh: dict) -> tuple[dict[str, Init], list[dict], dict]:
    """Each method's predictions ×1/r … ×1/r^steps and the controls matched to each prediction's update
    (shrink-and-perturb, pure shrink); with ``predicted_bn: init`` all of them carry BatchNorm at its initial
    values, as the released scripts' predicted networks do. Also the update decomposition and the seconds."""
    theta0 = traj.stages[0]
    bn = (lambda st: initmod.bn_at_init(st, fresh, traj.kinds)) if cfg.predicted_bn == "init" else (lambda st: st)
    out, decomposition, wall = {}, [], {}
    for method in cfg.methods:
        t0 = time.perf_counter()
        preds = retrodict(traj.stages, cfg.steps, method, models=models.get(method), kinds=traj.kinds)
        wall[method] = time.perf_counter() - t0
        for k, pred in enumerate(preds, 1):
            out[f"{method}-{k}"] = Init({"method": method, "step": k}, bn(pred))
            decomposition.append({"init": f"{method}-{k}", **initmod.decompose(theta0, traj.stages[1], pred, traj.kinds)})
            if method not in cfg.shrink_perturb_for:
                continue
            if "shrink-perturb" in cfg.controls:
                sp = initmod.shrink_perturb(theta0, pred, traj.kinds, seed=cfg.seed + k)
                out[f"sp-{method}-{k}"] = Init({"method": "shrink-perturb", "matches": method, "step": k}, bn(sp))
            if "shrink" in cfg.controls:
                out[f"shrink-{method}-{k}"] = Init({"method": "shrink", "matches": method, "step": k},
                                                   bn(initmod.shrink(theta0, pred, traj.kinds)))
    return out, decomposition, wall


def build_inits(cfg: TransferConfig, traj: Trajectory, models: dict) -> tuple[dict[str, Init], list[dict], dict]:
    """init id -> Init; the update decomposition rows; prediction seconds per method."""
    fresh = None
    if "bn-init" in cfg.controls or cfg.predicted_bn == "init":  # the initial values BN takes there
        info = data.DATASETS[traj.task.dataset]
        torch.manual_seed(cfg.seed)
        fresh = zoo.build(traj.family, traj.arch, info.channels, len(traj.task.classes)).state_dict()
    out = naive_controls(cfg, traj, fresh)
    preds, decomposition, wall = predicted(cfg, traj, models, fresh)
    out |= preds
    for init in out.values():
        init.desc.setdefault("multiplier", round((1 / traj.r) ** init.desc["step"], 4))
    return out, decomposition, wall


# -- 3. fine-tunes ----------------------------------------------------------------------------------------

@dataclass
class Job:
    key: tracking.Key
    init: Init
    traj: Trajectory


def plan_jobs(cfg: TransferConfig, trajs: dict[int, Trajectory], inits: dict[int, dict[str, Init]],
              done: dict[tracking.Key, dict]) -> list[Job]:
    """Every (initialisation, pre-training seed, seed) fine-tune of the config that has no finished child run."""
    seeds = [cfg.seed + i for i in range(cfg.downstream.seeds)]
    scratch = {"scratch": Init(dict(summary.SCRATCH), None)} if cfg.scratch else {}
    return [Job((name, p, seed), init, trajs[p]) for p in trajs for name, init in {**scratch, **inits[p]}.items()
            for seed in seeds if (name, p, seed) not in done]


def _finetune_job(init, family, arch, task_json, settings, seed, path, tuning_json):
    from evaluation.config import Tuning
    from evaluation.finetune import finetune

    tuning = Tuning.model_validate_json(tuning_json) if tuning_json else None
    return finetune(init, family, arch, Downstream.model_validate_json(task_json), settings, seed, path=path, tuning=tuning)


def run_finetunes(jobs: list[Job], cfg: TransferConfig, settings: data.DataSettings, workers: int | None, on_result) -> list[dict]:
    """Run every job as a Ray task, one CPU each; ``on_result`` gets each result as it finishes (and logs it)."""
    import ray
    from tqdm import tqdm

    task, tuning = cfg.downstream, cfg.tuning.model_dump_json() if cfg.tuning else None
    remote = ray.remote(num_cpus=1, max_retries=2)(_finetune_job)
    refs, keys, put = [], {}, {}
    limit = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    results, failures = [], []
    pending = list(jobs)
    with tqdm(total=len(jobs), desc="fine-tunes", unit="run") as bar:
        while pending or refs:
            while pending and len(refs) < limit:
                job = pending.pop(0)
                state = job.init.state
                if state is not None and id(state) not in put:
                    put[id(state)] = ray.put(state)
                ref = remote.remote(put[id(state)] if state is not None else None, job.traj.family, job.traj.arch,
                                    task.model_copy(update=job.init.finetune).model_dump_json(), settings, job.key[2],
                                    cfg.path, tuning)
                keys[ref] = job.key
                refs.append(ref)
            done, refs = ray.wait(refs, num_returns=1)
            (init, pseed, seed) = keys.pop(done[0])
            try:
                result = {"init": init, "pretrain_seed": pseed, "seed": seed, **ray.get(done[0])}
            except ray.exceptions.RayError as e:  # recorded, so one bad fine-tune does not hide the others
                failures.append(f"{(init, pseed, seed)}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
            else:
                on_result(result)
                results.append(result)
            bar.update(1)
    if failures:
        raise FinetuneError(f"{len(failures)} of {len(jobs)} fine-tunes failed:\n  " + "\n  ".join(failures[:10]))
    return results


# -- 4. summary and artifacts -----------------------------------------------------------------------------

def write_artifacts(cfg: TransferConfig, results: list[dict], descs: dict, trajs: dict[int, Trajectory], extras: dict,
                    settings: data.DataSettings) -> str:
    """Summarise ``results`` and log the tables, JSON and plots on the active (parent) run; returns the markdown."""
    import mlflow

    results, tuning = summary.select_rates(results) if cfg.tuning else (results, None)
    rows, comparisons = summary.summarize(results, descs, extras["source_acc"])
    gaps = summary.oracle_gaps(results, descs)
    first = trajs[next(iter(trajs))]
    test_n = len(task_split(first.task, settings, False, 0))
    verdict = summary.verdicts(rows, comparisons, extras["curves"], test_n, gaps, tuned=tuning is not None)
    if extras["protocol_note"]:
        verdict.insert(0, extras["protocol_note"])
    wall = extras["wall"]
    md = summary.markdown(cfg.name, rows, comparisons, gaps, extras["decomposition"], extras["curves"], wall, verdict,
                          extras["protocol"], tuning)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
        (d / "summary.csv").write_text(buf.getvalue())
        (d / "summary.md").write_text(md)
        (d / "summary.json").write_text(json.dumps({"rows": rows, "comparisons": comparisons, "gaps": gaps,
                                                     "decomposition": extras["decomposition"], "protocol": extras["protocol"],
                                                     "curves": {str(k): v for k, v in extras["curves"].items()}, "wall": wall,
                                                     "verdicts": verdict, "tuning": [{**t, "val": {f"{f:g}": v for f, v in t["val"].items()},
                                                                                     "test": {f"{f:g}": v for f, v in t["test"].items()}}
                                                                                    for t in tuning or []]}, indent=1))
        if tuning:
            plots.lr_curves(tuning, d / "lr_grid.png")
        plots.accuracy(rows, d / "accuracy.png")
        plots.forgetting(extras["curves"], d / "forgetting_curve.png")
        shown = {k: s for k, s in extras["first_states"].items()
                 if (k.endswith("-1") and not k.startswith(("sp-", "shrink-", "scaled-"))) or k in ("known-3", "average", "oracle-x2")}
        _, off = plots.pca_plane(first.stages, shown, initmod.predicted_names(first.kinds),
                                 lambda st: source_accuracy(first, st, settings, True), d / "pca_plane.png")
        mlflow.log_metrics({f"{k}.pca_off_plane": v for k, v in off.items()})
        mlflow.log_artifacts(str(d))
    mlflow.log_metrics(dict(wall))
    for r in rows:
        mlflow.log_metrics({f"{r['init']}.{k}": v for k, v in r.items() if isinstance(v, float) and not math.isnan(v) and k != "multiplier"})
    for g in gaps:
        mlflow.log_metric(f"{g['oracle']}.{g['phase']}_gap", g["gap"])
    return md


def load_predictors(cfg: TransferConfig, tracking_flag: str | None) -> dict:
    """The KNOWN models the config's methods need (one loader for predict, validate and evaluation)."""
    from known import registry

    sources = {"known": cfg.known, "known-official": cfg.known_official}
    return {m: registry.load_predictor(m, sources[m], tracking_flag) for m in ("known", "known-official") if m in cfg.methods}


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.Parser(prog="python -m evaluation.transfer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (see configs/eval-smoke.yaml)")
    p.add_argument("--data-root", default=None, help=f"datasets in torchvision's layout (default ${data.ENV_ROOT})")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment name")
    p.add_flag("--workers", "--num-workers", type=int, default=None, help="parallel fine-tunes (default: config, else cluster CPUs)")
    p.add_argument("--fresh", action="store_true", help="start a new parent run even where an unfinished one of this config exists")
    p.add_argument("--unverified-cifar10", action="store_true", help="accept a locally rebuilt CIFAR-10 (e.g. ../shared/data)")
    p.add_argument("--no-system-metrics", dest="system_metrics", action="store_false", help="do not log MLflow's "
                   "system metrics (the driver machine's CPU, memory, disk, network; GPU with nvidia-ml-py) with the parent run")
    return p.parse_args(argv)


def describe(cfg: TransferConfig, trajs: dict[int, Trajectory], models: dict, settings: data.DataSettings):
    """Per pre-training seed: the initialisations, the source-task accuracy of each stage (the forgetting
    curve) and of each initialisation, the update decomposition (first seed) and the seconds spent."""
    import mlflow

    inits, source_acc, curves, decomposition, wall = {}, {}, {}, [], {}
    for p, traj in trajs.items():
        for k, v in traj.wall.items():
            wall[k] = wall.get(k, 0.0) + v
        curves[p] = {"bn_reestimated": [source_accuracy(traj, s, settings, True) for s in traj.stages],
                     "bn_kept": [source_accuracy(traj, s, settings, False) for s in traj.stages]}
        for k, a in enumerate(curves[p]["bn_reestimated"]):
            mlflow.log_metric(f"source_acc_seed{p}", a, step=k)
        inits[p], dec, pwall = build_inits(cfg, traj, models)
        for m, s in pwall.items():
            wall[f"predict_{m}_s"] = wall.get(f"predict_{m}_s", 0.0) + s
        decomposition = decomposition or dec
        by_state = {id(traj.stages[0]): curves[p]["bn_reestimated"][0]}  # naive and its controls share Θ0
        for name, init in inits[p].items():
            if id(init.state) not in by_state:
                by_state[id(init.state)] = source_accuracy(traj, init.state, settings, True)
            source_acc.setdefault(name, []).append(by_state[id(init.state)])
    return inits, {"source_acc": {k: sum(v) / len(v) for k, v in source_acc.items()}, "curves": curves,
                   "decomposition": decomposition, "wall": wall}


def check(args: argparse.Namespace):
    """Everything checkable before any training: the config, the data (D0 and room for every oracle), the
    predictors, a reused sweep. Returns (config, data settings, predictors, reused trajectory or None)."""
    cfg = load_config(args.config)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    settings = data.DataSettings(data.resolve_root(args.data_root), False, args.unverified_cifar10 or cfg.unverified_cifar10)
    needed = {cfg.downstream.dataset} | ({cfg.source.dataset} if cfg.source else set())
    data.check_available(sorted(needed), settings)
    task_split(cfg.downstream, settings, True, 0)  # enough images for the asked train_size?
    for m in [1, *cfg.source.oracles] if cfg.source else []:
        task_split(cfg.source, settings, True, 0, m)
    models = load_predictors(cfg, args.tracking_uri)
    reused = from_catalog(cfg) if cfg.from_catalog else None  # a missing sweep is an error up front
    return cfg, settings, models, reused


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, settings, models, reused = check(args)
    except (OblivionError, OSError) as e:  # OSError: a missing file
        return cli.fail(e)

    import mlflow
    import ray
    from mlflow.exceptions import MlflowException

    try:  # before Ray starts: a bad store is one line, not a traceback after a cluster start
        uri = use_tracking(args.tracking_uri, args.experiment)
    except MlflowException as e:
        return cli.fail(f"MLflow tracking store {tracking_uri(args.tracking_uri)}: {e.message}")
    if not ray.is_initialized():
        ray.init()
    client = mlflow.MlflowClient(uri)
    exp_id = client.get_experiment_by_name(args.experiment).experiment_id
    text = Path(args.config).read_text()
    digest = tracking.config_digest(text)
    resume = None if args.fresh else tracking.unfinished_parent(client, exp_id, digest)
    run = (mlflow.start_run(run_id=resume, log_system_metrics=args.system_metrics) if resume else
           mlflow.start_run(run_name=cfg.name, tags={ROLE_TAG: "experiment", tracking.CONFIG_TAG: digest},
                            log_system_metrics=args.system_metrics))
    with run as parent:
        pid = parent.info.run_id
        protocol, note = protocol_check(cfg)
        if not resume:
            mlflow.log_text(text, "config.yaml")
            mlflow.log_params({"config_name": cfg.name, "methods": ",".join(cfg.methods), "steps": cfg.steps,
                               "downstream": f"{cfg.downstream.dataset}{cfg.downstream.classes}", "downstream_train_size": cfg.downstream.train_size,
                               "seeds": cfg.downstream.seeds, "pretrain_seeds": ",".join(map(str, cfg.pretrain_seeds)),
                               "source": f"{cfg.source.dataset}{cfg.source.classes}" if cfg.source else f"catalog:{cfg.from_catalog.sweep_id}",
                               "oracles": ",".join(map(str, cfg.source.oracles)) if cfg.source else "",
                               **{f"protocol.{k}": v for k, v in (protocol or {}).items()}})
        done = tracking.finished_children(client, exp_id, pid) if resume else {}
        if resume:
            print(f"resuming MLflow run {pid}: {len(done)} fine-tunes already finished", flush=True)
        trajs = prepare_trajectories(cfg, settings, pid) if cfg.source else {0: reused}
        inits, extras = describe(cfg, trajs, models, settings)
        descs = {name: init.desc for name, init in inits[next(iter(inits))].items()}
        jobs = plan_jobs(cfg, trajs, inits, done)
        t0 = time.perf_counter()
        try:
            new = run_finetunes(jobs, cfg, settings, args.workers or cfg.workers,
                                lambda r: tracking.log_child(client, exp_id, pid, r, descs.get(r["init"], summary.SCRATCH)))
        except FinetuneError as e:
            print(f"error: {e}", file=sys.stderr)
            mlflow.set_tag("oblivion.error", str(e)[:4000])
            mlflow.end_run("FAILED")
            return 1
        results = [*done.values(), *new]
        wall = extras["wall"]
        wall["finetune_s"] = time.perf_counter() - t0
        wall["finetune_per_run_s"] = sum(r["wall_s"] for r in results) / len(results)
        if "known" in cfg.methods or "known-official" in cfg.methods:
            know = min((s for k, s in wall.items() if k.startswith("predict_known")), default=0.0)
            wall["know_extra_over_naive"] = (wall["sweep_s"] + know) / max(wall["pretrain_s"], 1e-9)
        extras |= {"protocol": protocol, "protocol_note": note,
                   "first_states": {k: i.state for k, i in inits[next(iter(inits))].items()}}
        md = write_artifacts(cfg, results, descs, trajs, extras, settings)
        print(md)
        print(f"MLflow run {pid} in experiment {args.experiment!r} at {uri}; `mlflow ui --backend-store-uri {uri}` to browse it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
