"""Meta-train KNOWN on a collected meta-dataset: a Ray Train job that streams the shards.

    python -m known.train --collection runs/demo --epochs 3
    ray job submit --working-dir . -- python -m known.train --collection s3://bucket/meta …

Sweeps are split into train / validation by sweep id (never by scalar). Ray Data reads the shards (safe
decoder, files shuffled), turns every sweep into windows (one row per scalar: 5 inputs, 1 target, kind)
and feeds them to the training workers in batches through a shuffle buffer (``shuffled``), so memory stays bounded
whatever the size of the meta-dataset; each worker validates its share of the validation windows
(``known.ingest.Ingest``). One KNOWN per kind (conv / linear / bias), L1 loss on the residual.
Checkpoints every ``--checkpoint-every`` steps and at each epoch end; running the same command again (same
``--storage`` and ``--name``) resumes from the last checkpoint, and ``--max-failures`` lets Ray Train
restart killed workers from it. A checkpoint taken mid-epoch resumes within that epoch: its batches are read
again and the ones the checkpoint had trained are skipped, so a resumed run takes the uninterrupted run's steps
(the same batches when Ray Data delivers the epoch's blocks in the same order). It continues the same MLflow run
(its id is kept in ``--storage/--name/mlflow_run.json``). Metrics go to MLflow, the meta-dataset is recorded as the run's
dataset input (catalog sha256, sweeps by family × dataset); the checkpoint with the best validation relative L1
(not the last) is registered as ``KNOWN`` and becomes ``champion`` only if it beats the champion on the same
validation set (the champion is re-validated on this run's set when it was measured on another).

The pieces, each one module: ``known.batches`` (windows, mixing, the shuffle buffer, the train / validation
split), ``known.objective`` (the loss over one flat parameter, the pooled relative L1), ``known.checkpoint``
(save, restore, the best), ``known.loop`` (what every worker runs), ``known.training_run`` (the MLflow run and
the meta-dataset's lineage); this module is the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable

from known import registry
from known.batches import SHUFFLE_ROWS, split, to_rows, training_rows
from known.checkpoint import RANK, best_checkpoint
from known.loop import TrainConfig, train_loop
from known.model import DEFAULT_INPUTS, INPUT_MODES
from known.objective import METRIC, validation_metrics
from known.training_run import log_lineage, start_run
from meta import catalog, cli, readers, storage, tracking, verify
from meta.errors import OblivionError
from meta.record import CHANCE_MARGIN

log = logging.getLogger(__name__)


def require_counts(p: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> None:
    """Exit through ``p.error`` (usage and a one-line message) if one of the flags ``names`` is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.Parser(prog="python -m known.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_collection(p, "--shards", required=True, help="the collection: a folder or URI (catalog.parquet + shards/)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training windows")
    p.add_argument("--batch-size", type=int, default=8192, help="scalar windows per optimisation step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of sweeps held out (split by sweep id)")
    p.add_argument("--train-fraction", type=float, default=1.0, help="train on this nested part of the training "
                   "sweeps (size curves; the validation sweeps stay the same)")
    p.add_argument("--shuffle-buffer", type=int, default=SHUFFLE_ROWS, help="rows in each worker's shuffle buffer "
                   "(``shuffled``), which mixes the blocks of --sweeps-per-block sweeps")
    p.add_argument("--inputs", choices=INPUT_MODES, default=DEFAULT_INPUTS, help="KNOWN's input mode (known.model): raw "
                   "values (the paper), scaled (centred, divided by the path length) or rms (divided by the tensor's "
                   "RMS; the best on held-out sweeps, docs/known.md)")
    p.add_argument("--sweeps-per-block", type=int, default=16, help="sweeps whose windows are permuted together "
                   "before the shuffle buffer: the batches then mix that many sweeps")
    p.add_argument("--keep-unlearned", action="store_true", help="also train on sweeps whose Θ0 stayed within "
                   f"{100 * CHANCE_MARGIN:.0f}%% of chance (left out by default: nothing learned, nothing to forget)")
    p.add_argument("--bias-repeat", type=int, default=64, help="repeat bias windows this many times in training "
                   "(biases are rare: without it the bias KNOWN sees a few rows per batch)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_flag("--workers", "--num-workers", type=int, default=1, help="Ray Train workers (data-parallel)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs each training worker reserves; the rest "
                   "of the cluster's CPUs stay free for Ray Data (so a CPU-only cluster cannot deadlock)")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures Ray Train recovers from")
    p.add_argument("--storage", default="runs/known-train", help="Ray Train storage (checkpoints); local or URI")
    p.add_argument("--name", default="known", help="run name under --storage; the same name resumes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="known-meta-training", help="MLflow experiment")
    p.add_argument("--no-register", action="store_true", help="do not register the result in the model registry")
    p.add_argument("--no-system-metrics", dest="system_metrics", action="store_false", help="do not log MLflow's "
                   "system metrics (the driver machine's CPU, memory, disk, network; GPU with nvidia-ml-py) with the run")
    p.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None,
                   help="train on GPUs (default: when the Ray cluster has any, whatever the driver's machine has)")
    p.add_argument("--no-gpu", dest="use_gpu", action="store_false", help="train on CPUs even on a cluster with GPUs")
    args = p.parse_args(argv)
    require_counts(p, args, ("epochs", "batch_size", "checkpoint_every", "workers", "shuffle_buffer", "bias_repeat",
                             "sweeps_per_block"))
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not 0 < args.train_fraction <= 1:
        p.error(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    return args


def wants_gpu(flag: bool | None, resources: dict) -> bool:
    """--use-gpu / --no-gpu, else whether the cluster has GPUs: the driver may run on a CPU-only head."""
    return flag if flag is not None else resources.get("GPU", 0) > 0


def cpu_shortfall(workers: int, cpus_per_worker: float, cluster_cpus: float, nodes: int) -> str | None:
    """Why training on one machine would wait forever, or None. Ray Data streams the shards on CPUs the training
    workers do not hold, and on a single node nothing adds more (a cluster that autoscales can; its head's
    CPUs are 0 in infra/)."""
    need = workers * cpus_per_worker
    if nodes != 1 or cluster_cpus <= 0 or need < cluster_cpus:
        return None
    return (f"--workers {workers} × --cpus-per-worker {cpus_per_worker:g} = {need:g} CPUs, and this one-node cluster has "
            f"{cluster_cpus:g}: none would be left to stream the shards and training would wait forever; ask for at "
            f"most {cluster_cpus - 1:g} in all")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cli.require_collection(args.collection)
        done = [r for r in catalog.read(args.collection) if r["status"] == "done"]
        verify.require_intact(args.collection, catalog.read_table(args.collection, verify.COLUMNS))
        storage.check_output(args.storage, folder=True, flag="--storage")
    except OblivionError as e:  # an unreachable location, a corrupt catalog, a damaged shard
        return cli.fail(e)
    rows = training_rows(done, args.keep_unlearned)
    if not rows:
        return cli.fail(f"no done sweeps{' that learned' if done else ''} in {args.collection}'s catalog")
    train_ids, val_ids = split(rows, args.val_fraction, args.train_fraction)
    if not val_ids or not train_ids:
        return cli.fail(f"{len(rows)} sweeps cannot be split into train and validation with --val-fraction "
                        f"{args.val_fraction} and --train-fraction {args.train_fraction}; collect more sweeps or change "
                        "the fractions")

    import mlflow
    import ray
    from mlflow.exceptions import MlflowException

    try:  # before Ray starts: a bad store is one line, not a traceback after a cluster start
        uri = tracking.use_tracking(args.tracking_uri, args.experiment)
    except MlflowException as e:
        return cli.fail(f"MLflow tracking store {tracking.tracking_uri(args.tracking_uri)}: {e.message}")
    if not ray.is_initialized():
        ray.init()
    nodes = sum(n["Alive"] for n in ray.nodes())
    if why := cpu_shortfall(args.workers, args.cpus_per_worker, ray.cluster_resources().get("CPU", 0), nodes):
        return cli.fail(why)
    run, resumed = start_run(args)
    try:
        with run:
            if resumed:  # params are immutable in MLflow: a resume records its own arguments as a tag
                mlflow.set_tag("resumed_with", json.dumps(vars(args), sort_keys=True))
            else:
                mlflow.log_params({**vars(args), "n_sweeps_train": len(train_ids), "n_sweeps_val": len(val_ids),
                                   "n_sweeps_unlearned_left_out": len(done) - len(rows)})
                mlflow.log_text("\n".join(sorted(val_ids)), "validation_sweeps.txt")
            lineage = log_lineage(args, rows, train_ids, val_ids)
            fit_and_register(args, uri, run.info.run_id, train_ids, val_ids, lineage)
    except KeyboardInterrupt:  # the run is over, not failed; a SIGKILL leaves it RUNNING until a resume continues it
        mlflow.MlflowClient(uri).set_terminated(run.info.run_id, "KILLED")
        raise
    return 0


def fit_and_register(args, uri: str, run_id: str, train_ids: set[str], val_ids: set[str], lineage: dict) -> None:
    import mlflow
    import ray
    from ray.data import FileShuffleConfig
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from known.ingest import Ingest

    def dataset(ids, sweeps_per_block, repeat=None):
        return readers.ray_dataset(args.collection, where=lambda r: r["sweep_id"] in ids,
                                   shuffle=FileShuffleConfig(seed=args.seed)).map_batches(
            to_rows, batch_size=sweeps_per_block, fn_kwargs={"seed": args.seed, "repeat": repeat})

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, inputs=args.inputs,
                      threads=max(1, int(args.cpus_per_worker)), shuffle_buffer=args.shuffle_buffer,
                      checkpoint_every=args.checkpoint_every, tracking_uri=uri, run_id=run_id)
    val = dataset(val_ids, 1)  # every scalar once; a block per sweep, so that the workers can share the validation
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg.model_dump(),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=wants_gpu(args.use_gpu, ray.cluster_resources()),
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        datasets={"train": dataset(train_ids, args.sweeps_per_block, {"bias": args.bias_repeat}), "val": val},
        dataset_config=Ingest(),
        run_config=RunConfig(name=args.name, storage_path=storage.normalize(args.storage),
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=RANK,
                                                                checkpoint_score_order="min")),
    )
    result = trainer.fit()
    best, best_metrics = best_checkpoint(result.best_checkpoints)
    final = {k: v for k, v in result.metrics.items()
             if k.startswith(("val_", "train_beyond_range_")) or k in ("step", "resumed_from_step", "sweeps_per_batch")}
    final |= {"best_step": best_metrics["step"], f"best_{METRIC}": best_metrics[METRIC]}
    with best.as_directory() as d:
        models = registry.load_dir(d)
        mlflow.log_artifacts(d, artifact_path="best_checkpoint")
    mlflow.log_metrics({f"best_{METRIC}": best_metrics[METRIC], "best_step": best_metrics["step"]})
    print(json.dumps({"run_id": run_id, **final}, indent=1))
    if args.no_register:
        return

    def revalidate(champion: dict) -> float:
        return validation_metrics(champion, val.iter_torch_batches(batch_size=args.batch_size))[METRIC]

    version, champion, why = registry.publish(models, best_metrics[METRIC], lineage, uri, revalidate)
    print(f"registered {registry.MODEL_NAME} version {version} (best checkpoint, step {best_metrics['step']})"
          f"{' as ' + registry.ALIAS if champion else ': champion kept'}; {why}")


if __name__ == "__main__":
    sys.exit(main())
