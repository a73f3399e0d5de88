"""The meta-training loop that runs on every Ray Train worker, read top to bottom: fresh KNOWNs (or the last
checkpoint's), then per epoch the worker's shuffled batches, a step each, a checkpoint every
``checkpoint_every`` steps, and validation at the epoch's end."""

from __future__ import annotations

import itertools
import tempfile
import time

import torch
from pydantic import BaseModel, ConfigDict, Field

from known import registry
from known.batches import SHUFFLE_ROWS, epoch_batches
from known.checkpoint import RANK, UNMEASURED, Progress, restore, save
from known.model import DEFAULT_INPUTS, InputMode
from known.objective import METRIC, Objective, optimizer, train_step, validation_metrics


class TrainConfig(BaseModel):
    """What every worker's loop is told (Ray Train passes it as a dict: ``model_dump`` there, validated here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    seed: int = 0
    inputs: InputMode = DEFAULT_INPUTS
    threads: int = Field(default=1, ge=1)  # the native kernel's threads: the CPUs the worker reserved
    shuffle_buffer: int = Field(default=SHUFFLE_ROWS, ge=1)
    checkpoint_every: int = Field(default=200, ge=1)
    tracking_uri: str | None = None
    run_id: str | None = None  # the MLflow run rank 0 logs to


def train_metrics(p: Progress) -> dict[str, float]:
    """The epoch's running training metrics so far: L1 and the fraction beyond ±1 per kind, sweeps per batch."""
    out = {f"train_l1_{k}": s / max(n, 1) for k, (s, _, n) in p.sums.items()}
    out |= {f"train_beyond_range_{k}": o / max(n, 1) for k, (_, o, n) in p.sums.items()}
    return out | {"sweeps_per_batch": p.mixing[0] / max(p.mixing[1], 1)}  # distinct sweeps in a batch


def reporter(cfg: TrainConfig, ctx, models: dict, opt, resumed_from: int):
    """``report(metrics, progress)``: the metrics to MLflow (rank 0) and to Ray Train with a checkpoint."""
    import ray.train
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    rank0 = ctx.get_world_rank() == 0
    mlflow = MlflowClient(cfg.tracking_uri) if rank0 and cfg.run_id else None

    def report(metrics: dict, at: Progress) -> None:
        if mlflow:
            now = int(time.time() * 1000)  # MLflow's wall-time axis: a timestamp of 0 would put the run in 1970
            mlflow.log_batch(cfg.run_id, metrics=[Metric(k, float(v), now, at.step) for k, v in metrics.items()])
        with tempfile.TemporaryDirectory() as d:
            ck = ray.train.Checkpoint.from_directory(save(models, opt, at, d)) if rank0 else None
            ray.train.report({**metrics, RANK: metrics.get(METRIC, UNMEASURED), "step": at.step, "epoch": at.epoch,
                              "resumed_from_step": resumed_from}, checkpoint=ck)
    return report


def train_loop(raw: dict) -> None:
    """Runs on every Ray Train worker; ``raw``: a ``TrainConfig``'s ``model_dump``."""
    import ray.train
    from ray.train.torch import get_device

    cfg = TrainConfig.model_validate(raw)
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    device = get_device()  # batches are moved to it (CUDA when the worker has a GPU)
    models = {k: m.to(device) for k, m in registry.fresh(cfg.seed, cfg.inputs).items()}
    objective = Objective(models, threads=cfg.threads)
    opt = optimizer(objective, cfg.lr)
    progress = Progress()
    if ckpt := ray.train.get_checkpoint():  # resume: weights, optimiser state and progress of the last checkpoint
        with ckpt.as_directory() as d:
            progress = restore(models, opt, d, device)
    if ctx.get_world_size() > 1:
        from ray.train.torch import prepare_model

        objective = prepare_model(objective)
    report = reporter(cfg, ctx, models, opt, resumed_from=progress.step)  # a resumed run is visible as one
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    while progress.epoch < cfg.epochs:
        batches = epoch_batches(train_shard, cfg.batch_size, cfg.shuffle_buffer, cfg.seed + progress.epoch, device)
        for batch in itertools.islice(batches, progress.batches, None):  # those before a resumed checkpoint: skipped
            for k, got in train_step(objective, opt, batch).items():
                progress.sums[k] = [a + b for a, b in zip(progress.sums[k], got)]
            progress.mixing = [progress.mixing[0] + len(torch.unique(batch["sweep"])), progress.mixing[1] + 1]
            progress.step, progress.batches = progress.step + 1, progress.batches + 1
            if progress.step % cfg.checkpoint_every == 0:
                report(train_metrics(progress), progress)
        val = validation_metrics(models, val_shard.iter_torch_batches(batch_size=cfg.batch_size),
                                 across_ranks=ctx.get_world_size() > 1)  # each rank validated its split (Ingest)
        metrics = {**train_metrics(progress), **val}
        progress = progress.next_epoch()
        report(metrics, progress)
