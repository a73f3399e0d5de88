"""Does KNOW beat naive transfer, and how much could it? One config, one command, everything in MLflow.

    python -m evaluation.transfer --config configs/eval-smoke.yaml
    ray job submit --working-dir . -- python -m evaluation.transfer --config …

Read ``experiment`` top to bottom; each step is one module:

1. ``evaluation.trajectories``: per pre-training seed, Θ0 on D0 and its forgetting sweep Θ1…Θ4, the oracles
   (Θ0's recipe on ×2, ×4 the data) and Θ0 trained to convergence, as parallel Ray tasks kept as artifacts of
   the parent run; or Θ0…Θ4 of a collected sweep.
2. ``evaluation.inits``: naive Θ0, each method's predictions ×1/r … ×1/r^steps, the oracles, and the controls
   that say where a gain comes from (``describe`` adds their source-task accuracy and the forgetting curve).
3. ``evaluation.runner``: every (initialisation, pre-training seed, seed) fine-tune not already finished, as Ray
   tasks under the collector's failure policy; each is logged as a child run the moment it finishes
   (``evaluation.tracking``), so a killed experiment loses only the fine-tunes in flight and the same command
   continues it.
4. ``evaluation.artifacts``: the summary (``evaluation.summary``), tables and plots on the parent run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from collectors import data
from collectors.config import ConfigError
from evaluation import summary, tracking
from evaluation.artifacts import Extras, write_artifacts
from evaluation.config import TransferConfig, load_config
from evaluation.finetune import task_split
from evaluation.inits import Init, build_inits
from evaluation.runner import FinetuneError, plan_jobs, run_finetunes
from evaluation.trajectories import Trajectory, from_catalog, prepare_trajectories, protocol_check, source_accuracy
from meta import cli
from meta.errors import OblivionError
from meta.tracking import tracking_uri, use_tracking

log = logging.getLogger(__name__)
EXPERIMENT, ROLE_TAG = summary.EXPERIMENT, summary.ROLE_TAG


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


def describe(cfg: TransferConfig, trajs: dict[int, Trajectory], models: dict,
             settings: data.DataSettings) -> tuple[dict[int, dict[str, Init]], Extras]:
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
    return inits, Extras({k: sum(v) / len(v) for k, v in source_acc.items()}, curves, decomposition, wall)


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


def open_parent(client, exp_id: str, args: argparse.Namespace, cfg: TransferConfig, protocol: dict | None):
    """(the parent run, resumed or not): the latest unfinished run of this exact config, else a new one with
    the config and its parameters logged."""
    import mlflow

    text = Path(args.config).read_text()
    digest = tracking.config_digest(text)
    resume = None if args.fresh else tracking.unfinished_parent(client, exp_id, digest)
    source = {tracking.SOURCE_TAG: source_digest(cfg)} if cfg.source else {}
    if resume:
        run = mlflow.start_run(run_id=resume, log_system_metrics=args.system_metrics)
        mlflow.set_tags(source)  # a run begun before the tag existed
        return run, True
    run = mlflow.start_run(run_name=cfg.name, tags={ROLE_TAG: "experiment", tracking.CONFIG_TAG: digest, **source},
                           log_system_metrics=args.system_metrics)
    mlflow.log_text(text, "config.yaml")
    src = cfg.source
    mlflow.log_params({"config_name": cfg.name, "methods": ",".join(cfg.methods), "steps": cfg.steps,
                       "downstream": f"{cfg.downstream.dataset}{cfg.downstream.classes}", "downstream_train_size": cfg.downstream.train_size,
                       "seeds": cfg.downstream.seeds, "pretrain_seeds": ",".join(map(str, cfg.pretrain_seeds)),
                       "source": f"{src.dataset}{src.classes}" if src else f"catalog:{cfg.from_catalog.sweep_id}",
                       "oracles": ",".join(map(str, src.oracles)) if src else "",
                       **{f"protocol.{k}": v for k, v in (protocol or {}).items()}})
    return run, False


def source_digest(cfg: TransferConfig) -> str:
    """What decides the pre-trained models: the source config and the sweep path."""
    return tracking.config_digest(json.dumps({"source": cfg.source.model_dump(mode="json"), "path": cfg.path}, sort_keys=True))


def add_walls(cfg: TransferConfig, wall: dict, results: list[dict], finetune_s: float) -> None:
    wall["finetune_s"] = finetune_s
    wall["finetune_per_run_s"] = sum(r["wall_s"] for r in results) / len(results)
    if "known" in cfg.methods or "known-official" in cfg.methods:
        know = min((s for k, s in wall.items() if k.startswith("predict_known")), default=0.0)
        wall["know_extra_over_naive"] = (wall["sweep_s"] + know) / max(wall["pretrain_s"], 1e-9)


def experiment(cfg, args, client, exp_id: str, pid: str, resume: bool, models: dict, settings, reused,
               protocol: tuple[dict | None, str | None]) -> int:
    """The experiment under its parent run ``pid``: trajectories, initialisations, fine-tunes, summary."""
    import mlflow

    done = tracking.finished_children(client, exp_id, pid) if resume else {}
    if resume:
        print(f"resuming MLflow run {pid}: {len(done)} fine-tunes already finished", flush=True)
    donors = tracking.source_parents(client, exp_id, source_digest(cfg), pid) if cfg.source else []
    trajs = prepare_trajectories(cfg, settings, pid, donors) if cfg.source else {0: reused}
    inits, extras = describe(cfg, trajs, models, settings)
    first = inits[next(iter(inits))]
    descs = {name: init.desc for name, init in first.items()}
    t0 = time.perf_counter()
    try:
        new = run_finetunes(plan_jobs(cfg, trajs, inits, done), cfg, settings, args.workers or cfg.workers,
                            lambda r: tracking.log_child(client, exp_id, pid, r, descs.get(r["init"], summary.SCRATCH)))
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        mlflow.set_tag("oblivion.error", str(e)[:4000])
        mlflow.end_run("FAILED")
        return 1
    results = [*done.values(), *new]
    add_walls(cfg, extras.wall, results, time.perf_counter() - t0)
    extras.protocol, extras.protocol_note = protocol
    extras.first_states = {k: i.state for k, i in first.items()}
    print(write_artifacts(cfg, results, descs, trajs, extras, settings))
    return 0


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
    protocol = protocol_check(cfg)  # the evaluation sweep's protocol, and how it compares with the KNOWN's
    run, resume = open_parent(client, exp_id, args, cfg, protocol[0])
    with run as parent:
        status = experiment(cfg, args, client, exp_id, parent.info.run_id, resume, models, settings, reused, protocol)
    if status == 0:
        print(f"MLflow run {parent.info.run_id} in experiment {args.experiment!r} at {uri}; "
              f"`mlflow ui --backend-store-uri {uri}` to browse it")
    return status


if __name__ == "__main__":
    sys.exit(main())
