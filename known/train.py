"""Meta-train KNOWN on a collected meta-dataset: a Ray Train job that streams the shards.

    python -m known.train --shards runs/demo --epochs 3
    ray job submit --working-dir . -- python -m known.train --shards s3://bucket/meta …

Sweeps are split into train / validation by sweep id (never by scalar). Ray Data reads the shards (safe
decoder, files shuffled), turns every sweep into windows (one row per scalar: 5 inputs, 1 target, kind)
and feeds them to the training workers in batches through a local shuffle buffer, so memory stays bounded
whatever the size of the meta-dataset. One KNOWN per kind (conv / linear / bias), L1 loss on the residual.
Checkpoints every ``--checkpoint-every`` steps and at each epoch end; running the same command again (same
``--storage`` and ``--name``) resumes from the last checkpoint, and ``--max-failures`` lets Ray Train
restart killed workers from it. A checkpoint taken mid-epoch resumes at the start of that epoch, with the
checkpoint's weights (the batches before it are seen once more) and continues the same MLflow run (its id is
kept in ``--storage/--name/mlflow_run.json``). Metrics go to MLflow, the meta-dataset is recorded as the run's
dataset input (catalog sha256, sweeps by family × dataset); the checkpoint with the best validation relative L1
(not the last) is registered as ``KNOWN`` and becomes ``champion`` only if it beats the champion on the same
validation set (the champion is re-validated on this run's set when it was measured on another).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from known import baselines, native, registry, tracking
from known.model import INPUT_MODES, PREDICTED_KINDS, S
from known.windows import KIND_IDS, is_validation, sweep_windows
from meta import catalog, readers, storage
from meta.record import CHANCE_MARGIN, learned

METRIC = registry.METRIC
# Ray Train keeps the best checkpoints by RANK: METRIC where an epoch end measured it, else UNMEASURED (ranked
# last; a finite number because NaN and inf do not survive Ray's checkpoint snapshot, which a resume reads)
RANK, UNMEASURED = "checkpoint_rank", 1e30
RUN_FILE = "mlflow_run.json"  # next to Ray Train's checkpoints: the MLflow run a resumed training continues
log = logging.getLogger(__name__)


def to_rows(batch: dict, seed: int = 0, repeat: dict | None = None) -> dict:
    """Ray Data map_batches: sweeps (sweep_id, json, safetensors) -> one row per (scalar, window).

    The rows of every sweep in ``batch`` are permuted together, so that the batches cut from them mix that
    many sweeps (``--sweeps-per-block``; the shuffle buffer mixes further). ``repeat`` (kind -> n) repeats
    the rows of a rare kind n times: biases are ~0.03% of the scalars, so in a mixed batch of 8,192 rows the
    bias KNOWN would see about two per step. ``sweep`` numbers the sweep of each row (to count distinct
    sweeps per training batch)."""
    cols: dict[str, list] = {"x": [], "y": [], "rms": [], "kind": [], "sweep": []}
    for sid, js, st in zip(batch["sweep_id"], batch["json"], batch["safetensors"]):
        sample = readers.row_to_sample({"sweep_id": sid, "json": js, "safetensors": st})
        for kind, w in sweep_windows(sample).items():
            n = (repeat or {}).get(kind, 1)
            cols["x"].append(np.repeat(w.x, n, axis=0) if n > 1 else w.x)
            for name, v in (("y", w.y), ("rms", w.rms)):
                cols[name].append(np.repeat(v, n) if n > 1 else v)
            cols["kind"].append(np.full(len(w.y) * n, KIND_IDS[kind], dtype=np.int8))
            cols["sweep"].append(np.full(len(w.y) * n, int(sid[:7], 16), dtype=np.int32))  # 28 bits of the hex id
    if not cols["x"]:
        return {"x": np.zeros((0, S), np.float32), "y": np.zeros(0, np.float32), "rms": np.zeros(0, np.float32),
                "kind": np.zeros(0, np.int8), "sweep": np.zeros(0, np.int32)}
    out = {k: np.concatenate(v) for k, v in cols.items()}
    n = len(out["y"])  # mix layers and sweeps before the shuffle buffer; int32 indices gather 23% faster
    order = np.random.default_rng(seed).permutation(n).astype(np.int32 if n < 2**31 else np.int64)
    return {k: np.take(v, order, axis=0) for k, v in out.items()}


class ErrorSums:
    """Running Σ|error| per kind and method on validation windows, relative to Σ|Θk+1 − Θk| ("step")."""

    METHODS = ("known", "taskvector", "linearfit")

    def __init__(self):
        self.sums = {(k, m): 0.0 for k in PREDICTED_KINDS for m in (*self.METHODS, "step")}

    def add(self, kind: str, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor) -> None:
        """Add one kind's validation windows ``x`` with targets ``y`` and KNOWN's predictions ``pred``."""
        self.sums[(kind, "known")] += (pred - y).abs().sum().item()
        self.sums[(kind, "taskvector")] += (baselines.predict("taskvector", x) - y).abs().sum().item()
        self.sums[(kind, "linearfit")] += (baselines.predict("linearfit", x) - y).abs().sum().item()
        self.sums[(kind, "step")] += (x[:, -1] - y).abs().sum().item()

    def metrics(self) -> dict[str, float]:
        out = {}
        for m in self.METHODS:
            num = sum(self.sums[(k, m)] for k in PREDICTED_KINDS)
            den = sum(self.sums[(k, "step")] for k in PREDICTED_KINDS)
            out[f"val_rel_l1_{m}"] = num / den if den else float("nan")
            for k in PREDICTED_KINDS:
                d = self.sums[(k, "step")]
                out[f"val_rel_l1_{m}_{k}"] = self.sums[(k, m)] / d if d else float("nan")
        out[METRIC] = out["val_rel_l1_known"]
        return out


@torch.no_grad()
def validation_metrics(models: dict, batches) -> dict[str, float]:
    """``ErrorSums.metrics`` of ``models`` over validation ``batches``: run on the workers at each epoch end and
    on the driver to re-validate the champion on this run's validation set."""
    errors = ErrorSums()
    for batch in batches:
        x, y, rms, kind = batch["x"].float(), batch["y"].float(), batch["rms"].float(), batch["kind"]
        for k, model in models.items():
            mask = kind == KIND_IDS[k]
            if mask.any():
                errors.add(k, x[mask], y[mask], model.step(x[mask], rms[mask]))
    return errors.metrics()


def best_checkpoint(results: list[tuple]) -> tuple:
    """The (checkpoint, metrics) with the lowest ``METRIC`` among Ray Train's ``best_checkpoints``: only the
    epoch-end reports carry it; a mid-epoch checkpoint (the latest, kept for resuming) never wins."""
    scored = [(c, m) for c, m in results if math.isfinite(m.get(METRIC, math.nan))]
    if not scored:
        raise ValueError(f"no checkpoint with a finite {METRIC}: did any epoch finish?")
    return min(scored, key=lambda cm: cm[1][METRIC])


def _checkpoint_dir(models, opts, epoch: int, step: int, d: str) -> str:
    registry.save_dir(models, d)
    torch.save({k: o.state_dict() for k, o in opts.items()}, Path(d) / "optimizers.pt")
    (Path(d) / "progress.json").write_text(json.dumps({"epoch": epoch, "step": step}))
    return d


def restore(models: dict, opts: dict, d: str, device="cpu") -> tuple[int, int]:
    """Load a checkpoint folder written by ``_checkpoint_dir`` into ``models`` / ``opts``; (epoch, step)."""
    for k, m in registry.load_dir(d).items():
        if m.inputs != models[k].inputs:  # same weights, other inputs: resuming would train nonsense
            raise ValueError(f"checkpoint {d} holds a {k} KNOWN with inputs={m.inputs!r}; this run trains "
                             f"inputs={models[k].inputs!r}: start a new --name")
        models[k].load_state_dict(m.state_dict())
    for k, st in torch.load(Path(d) / "optimizers.pt", map_location=device, weights_only=True).items():
        opts[k].load_state_dict(st)
    progress = json.loads((Path(d) / "progress.json").read_text())
    return progress["epoch"], progress["step"]


def optimizers(models: dict, lr: float) -> dict:
    """One Adam per kind, its update one fused op per step: the per-tensor loop took 2 of a step's 12 ms with the
    native kernel (torch's profiler on an in-memory train_step; fused: 0.6 ms)."""
    return {k: torch.optim.Adam(m.parameters(), lr=lr, fused=True) for k, m in models.items()}


class Objective(nn.Module):
    """Every kind's training loss on one batch, as one module: DDP wraps it once, so a step costs one gradient
    allreduce instead of one per kind (three DDP wrappers made a two-worker step 1.6x slower than none,
    bench/train_throughput.py). ``models`` stay the modules that are trained, checkpointed and validated.

    On the CPU the native kernel (known/native.py) takes the whole batch in one call, rows grouped by kind, on
    ``threads`` threads; elsewhere each kind's ``KNOWN.loss`` runs in torch."""

    def __init__(self, models: dict, threads: int = 1):
        super().__init__()
        self.models = nn.ModuleDict(models)
        self.threads = threads
        modes = {m.inputs for m in models.values()}
        if len(modes) != 1:
            raise ValueError(f"the kinds' KNOWNs read different input modes {sorted(modes)}: train one mode at a time")

    def forward(self, x: torch.Tensor, y: torch.Tensor, rms: torch.Tensor, kind: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(Σ of the kinds' mean L1 losses, kind -> (loss, fraction beyond ±1, rows)) for the kinds in the batch."""
        if all(native.runs(x, m) for m in self.models.values()):
            return self._native(x, y, rms, kind)
        total, out = x.new_zeros(()), {}
        for k, model in self.models.items():
            mask = kind == KIND_IDS[k]
            n = int(mask.sum())
            if n:
                loss, outside = model.loss(x[mask], y[mask], rms=rms[mask])
                out[k] = (loss.detach(), outside, n)
            else:  # every rank must give every parameter a gradient (DDP's allreduce), even on a batch
                loss = model(x[:1]).sum() * 0.0  # without this kind: a zero-weighted pass
            total = total + loss
        return total, out

    def _native(self, x, y, rms, kind) -> tuple[torch.Tensor, dict]:
        rows = [torch.nonzero(kind == KIND_IDS[k]).flatten() for k in self.models]
        order, counts = torch.cat(rows), [len(r) for r in rows]  # rows grouped by kind, in the models' order
        inputs, centre, scale = next(iter(self.models.values())).prepare(x[order], rms[order])
        t = (y[order] - centre) / scale
        losses = native.l1(list(self.models.values()), inputs, t.clamp(-1, 1), counts, self.threads)
        beyond = (t.abs() > 1).float().split(counts)
        out = {k: (losses[i].detach(), beyond[i].mean(), n) for i, (k, n) in enumerate(zip(self.models, counts)) if n}
        return losses.sum(), out


def train_step(objective: nn.Module, opts: dict, batch: dict) -> dict[str, tuple[float, float, int]]:
    """One optimisation step of every kind's KNOWN on its rows of ``batch`` (``objective``: an ``Objective``, or
    its DDP wrapper); kind -> (Σ loss, Σ beyond ±1, rows)."""
    x, y, rms, kind = batch["x"].float(), batch["y"].float(), batch["rms"].float(), batch["kind"]
    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    total, out = objective(x, y, rms, kind)
    total.backward()  # each kind's loss reaches only its own KNOWN's parameters
    for opt in opts.values():
        opt.step()
    return {k: (loss.item() * n, outside.item() * n, n) for k, (loss, outside, n) in out.items()}


def train_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from ray.train.torch import get_device

    torch.manual_seed(cfg["seed"])
    ctx = ray.train.get_context()
    device = get_device()  # batches arrive on it (CUDA when the worker has a GPU)
    models = {k: m.to(device) for k, m in registry.fresh(cfg["seed"], cfg["inputs"]).items()}
    opts = optimizers(models, cfg["lr"])
    epoch0, step = 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resume: weights, optimiser state and progress of the last checkpoint
        with ckpt.as_directory() as d:
            epoch0, step = restore(models, opts, d, device)
    resumed_from = step  # reported with every metric, so a resumed run is visible as one
    objective = Objective(models, threads=cfg.get("threads", 1))
    if ctx.get_world_size() > 1:
        from ray.train.torch import prepare_model

        objective = prepare_model(objective)
    mlflow = MlflowClient(cfg["tracking_uri"]) if ctx.get_world_rank() == 0 and cfg.get("run_id") else None

    def report(metrics: dict, epoch: int) -> None:
        if mlflow:
            mlflow.log_batch(cfg["run_id"], metrics=[Metric(k, float(v), 0, step) for k, v in metrics.items()])
        with tempfile.TemporaryDirectory() as d:
            ck = ray.train.Checkpoint.from_directory(_checkpoint_dir(models, opts, epoch, step, d)) if ctx.get_world_rank() == 0 else None
            ray.train.report({**metrics, RANK: metrics.get(METRIC, UNMEASURED), "step": step, "epoch": epoch,
                              "resumed_from_step": resumed_from}, checkpoint=ck)

    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    def train_metrics(sums: dict, mixing: list) -> dict:
        out = {f"train_l1_{k}": s / max(n, 1) for k, (s, _, n) in sums.items()}
        out |= {f"train_beyond_range_{k}": o / max(n, 1) for k, (_, o, n) in sums.items()}
        return out | {"sweeps_per_batch": float(np.mean(mixing)) if mixing else 0.0}

    for epoch in range(epoch0, cfg["epochs"]):
        sums = {k: [0.0, 0.0, 0] for k in PREDICTED_KINDS}
        mixing = []  # distinct sweeps in each training batch
        for batch in train_shard.iter_torch_batches(batch_size=cfg["batch_size"], local_shuffle_buffer_size=cfg["shuffle_buffer"],
                                                    local_shuffle_seed=cfg["seed"] + epoch):
            for k, got in train_step(objective, opts, batch).items():
                sums[k] = [a + b for a, b in zip(sums[k], got)]
            mixing.append(len(torch.unique(batch["sweep"])))
            step += 1
            if step % cfg["checkpoint_every"] == 0:
                report(train_metrics(sums, mixing), epoch)
        val = validation_metrics(models, val_shard.iter_torch_batches(batch_size=cfg["batch_size"]))
        report({**train_metrics(sums, mixing), **val}, epoch + 1)


def training_rows(done: list[dict], keep_unlearned: bool = False) -> list[dict]:
    """The done catalog rows to meta-train on: a Θ0 that never learned has nothing to forget."""
    return [r for r in done if keep_unlearned or learned(r["stage_test_acc"][0])]


def split(rows: list[dict], val_fraction: float, train_fraction: float = 1.0) -> tuple[set[str], set[str]]:
    """(train ids, validation ids). ``train_fraction`` keeps a nested, deterministic part of the training
    sweeps (a size curve: ¼ ⊂ ½ ⊂ all) and never changes the validation sweeps."""
    val = {r["sweep_id"] for r in rows if is_validation(r["sweep_id"], val_fraction)}
    train = {r["sweep_id"] for r in rows if r["sweep_id"] not in val and is_validation("train:" + r["sweep_id"], train_fraction)}
    return train, val


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m known.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="meta-dataset folder or URI (catalog.parquet + shards/)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training windows")
    p.add_argument("--batch-size", type=int, default=8192, help="scalar windows per optimisation step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of sweeps held out (split by sweep id)")
    p.add_argument("--train-fraction", type=float, default=1.0, help="train on this nested part of the training "
                   "sweeps (size curves; the validation sweeps stay the same)")
    p.add_argument("--shuffle-buffer", type=int, default=65536, help="rows in each worker's local shuffle buffer")
    p.add_argument("--inputs", choices=INPUT_MODES, default="rms", help="KNOWN's input mode (known.model): raw "
                   "values (the paper), scaled (centred, divided by the path length) or rms (divided by the tensor's "
                   "RMS; the best on held-out sweeps, README)")
    p.add_argument("--sweeps-per-block", type=int, default=16, help="sweeps whose windows are permuted together "
                   "before the shuffle buffer: the batches then mix that many sweeps")
    p.add_argument("--keep-unlearned", action="store_true", help="also train on sweeps whose Θ0 stayed within "
                   f"{CHANCE_MARGIN:.0%} of chance (left out by default: nothing learned, nothing to forget)")
    p.add_argument("--bias-repeat", type=int, default=64, help="repeat bias windows this many times in training "
                   "(biases are rare: without it the bias KNOWN sees a few rows per batch)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (data-parallel)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs each training worker reserves; the rest "
                   "of the cluster's CPUs stay free for Ray Data (so a CPU-only cluster cannot deadlock)")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures Ray Train recovers from")
    p.add_argument("--storage", default="runs/known-train", help="Ray Train storage (checkpoints); local or URI")
    p.add_argument("--name", default="known", help="run name under --storage; the same name resumes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="known-meta-training", help="MLflow experiment")
    p.add_argument("--no-register", action="store_true", help="do not register the result in the model registry")
    p.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None,
                   help="train on GPUs (default: when the Ray cluster has any, whatever the driver's machine has)")
    p.add_argument("--no-gpu", dest="use_gpu", action="store_false", help="train on CPUs even on a cluster with GPUs")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "checkpoint_every", "num_workers", "shuffle_buffer", "bias_repeat", "sweeps_per_block"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
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


def validation_digest(val_ids: set[str]) -> str:
    """The validation set's identity: numbers measured on sets with other digests are not compared."""
    return hashlib.sha256("\n".join(sorted(val_ids)).encode()).hexdigest()


def _run_file(args) -> tuple:
    fs, path = storage.resolve(storage.join(storage.normalize(args.storage), args.name, RUN_FILE))
    return fs, path


def stored_run_id(args) -> str | None:
    """The MLflow run of an earlier training under the same --storage / --name, which a resume continues."""
    fs, path = _run_file(args)
    if not storage.exists(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())["run_id"]


def store_run_id(args, run_id: str) -> None:
    fs, path = _run_file(args)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    storage.write_atomic(fs, path, json.dumps({"run_id": run_id}).encode())


def log_lineage(args, rows: list[dict], train_ids: set[str], val_ids: set[str]) -> dict[str, str]:
    """Record the meta-dataset as the run's MLflow dataset input; returns the lineage tags of the model version."""
    import mlflow
    import pandas as pd

    digest = registry.catalog_sha256(args.shards)
    used = [r for r in rows if r["sweep_id"] in train_ids | val_ids]
    df = pd.DataFrame({"sweep_id": [r["sweep_id"] for r in used], "family": [r["family"] for r in used],
                       "dataset": [r["dataset"] for r in used],
                       "split": ["validation" if r["sweep_id"] in val_ids else "train" for r in used]})
    mlflow.log_input(mlflow.data.from_pandas(df, source=storage.normalize(args.shards), name="meta-dataset",
                                             digest=digest[:32]), context="training", tags={"catalog_sha256": digest})
    mlflow.log_dict({split: registry.by_family_dataset([r for r in used if (r["sweep_id"] in val_ids) == (split == "validation")])
                     for split in ("train", "validation")}, "sweeps_by_family_dataset.json")
    return {"catalog_sha256": digest, registry.VAL_DIGEST: validation_digest(val_ids), "shards": args.shards}


def _start_run(args):
    """A new MLflow run, or the one an earlier training under the same --storage / --name started."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = stored_run_id(args)
    if run_id:
        try:
            return mlflow.start_run(run_id=run_id), True
        except MlflowException as e:
            log.warning("run %s of %s/%s not in this tracking store (%s): starting a new one", run_id, args.storage, args.name, e)
    run = mlflow.start_run(run_name=args.name)
    store_run_id(args, run.info.run_id)
    return run, False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    done = [r for r in catalog.read(args.shards) if r["status"] == "done"]
    rows = training_rows(done, args.keep_unlearned)
    if not rows:
        print(f"error: no done sweeps{' that learned' if done else ''} in {args.shards}/{catalog.FILENAME}", file=sys.stderr)
        return 2
    train_ids, val_ids = split(rows, args.val_fraction, args.train_fraction)
    if not val_ids or not train_ids:
        print(f"error: {len(rows)} sweeps cannot be split into train and validation with --val-fraction "
              f"{args.val_fraction} and --train-fraction {args.train_fraction}; collect more sweeps or change the "
              "fractions", file=sys.stderr)
        return 2

    import mlflow
    import ray

    if not ray.is_initialized():
        ray.init()
    uri = tracking.use_tracking(args.tracking_uri, args.experiment)
    run, resumed = _start_run(args)
    try:
        with run:
            if resumed:  # params are immutable in MLflow: a resume records its own arguments as a tag
                mlflow.set_tag("resumed_with", json.dumps(vars(args), sort_keys=True))
            else:
                mlflow.log_params({**vars(args), "n_sweeps_train": len(train_ids), "n_sweeps_val": len(val_ids),
                                   "n_sweeps_unlearned_left_out": len(done) - len(rows)})
                mlflow.log_text("\n".join(sorted(val_ids)), "validation_sweeps.txt")
            lineage = log_lineage(args, rows, train_ids, val_ids)
            _fit_and_register(args, uri, run.info.run_id, train_ids, val_ids, lineage)
    except KeyboardInterrupt:  # the run is over, not failed; a SIGKILL leaves it RUNNING until a resume continues it
        mlflow.MlflowClient(uri).set_terminated(run.info.run_id, "KILLED")
        raise
    return 0


def _fit_and_register(args, uri: str, run_id: str, train_ids: set[str], val_ids: set[str], lineage: dict) -> None:
    import mlflow
    import ray
    from ray.data import FileShuffleConfig
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def dataset(ids, repeat=None):
        return readers.ray_dataset(args.shards, where=lambda r: r["sweep_id"] in ids,
                                   shuffle=FileShuffleConfig(seed=args.seed)).map_batches(
            to_rows, batch_size=args.sweeps_per_block, fn_kwargs={"seed": args.seed, "repeat": repeat})

    cfg = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "inputs": args.inputs,
           "threads": max(1, int(args.cpus_per_worker)),  # the native kernel's threads: the CPUs the worker reserved
           "shuffle_buffer": args.shuffle_buffer, "checkpoint_every": args.checkpoint_every,
           "tracking_uri": uri, "run_id": run_id}
    val = dataset(val_ids)  # validation counts every scalar once
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=wants_gpu(args.use_gpu, ray.cluster_resources()),
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        datasets={"train": dataset(train_ids, {"bias": args.bias_repeat}), "val": val},
        dataset_config=DataConfig(datasets_to_split=["train"]),
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
