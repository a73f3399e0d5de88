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
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from known import baselines, native, predict, registry
from known.model import INPUT_MODES, PREDICTED_KINDS, S
from known.windows import KIND_IDS, is_validation, sweep_windows
from meta import catalog, cli, readers, storage, tracking, verify
from meta.errors import OblivionError
from meta.record import CHANCE_MARGIN, learned

METRIC = registry.METRIC
# Ray Train keeps the best checkpoints by RANK: METRIC where an epoch end measured it, else UNMEASURED (ranked
# last; a finite number because NaN and inf do not survive Ray's checkpoint snapshot, which a resume reads)
RANK, UNMEASURED = "checkpoint_rank", 1e30
# 262,144 rows (8.7 MB): batches of meta-v2 mixed 21.4 sweeps (min 16) against 16.1 (min 6) with 65,536 and
# 19.6 (min 16) through Ray Data's buffer of 65,536, which took 2.5x as long per row (bench/stream_throughput.py)
SHUFFLE_ROWS = 262_144
# to_rows permutes runs of 64 rows, not rows: 48 instead of 85 ns per row (16 meta-v2 sweeps, warm), the same
# 21.4 sweeps per batch after ``shuffled``
RUN_ROWS = 64
OPTIMIZER_FILE = "optimizer.pt"  # in a checkpoint, next to the KNOWNs' safetensors
PROGRESS_FILE = "progress.json"  # and its ``Progress``
RUN_FILE = "mlflow_run.json"  # next to Ray Train's checkpoints: the MLflow run a resumed training continues
log = logging.getLogger(__name__)


def to_rows(batch: dict, seed: int = 0, repeat: dict | None = None) -> dict:
    """Ray Data map_batches: sweeps (sweep_id, json, safetensors) -> one row per (scalar, window).

    The rows of every sweep in ``batch`` are permuted together, in runs of ``RUN_ROWS``, so that the batches
    cut from them mix that many sweeps (``--sweeps-per-block``; ``shuffled`` then mixes rows and blocks).
    ``repeat`` (kind -> n) repeats the rows of a rare kind n times: biases are ~0.03% of the scalars, so in a
    mixed batch of 8,192 rows the bias KNOWN would see about two per step. ``sweep`` numbers the sweep of each
    row (to count distinct sweeps per training batch)."""
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
    n = len(out["y"])  # mix layers and sweeps in runs of RUN_ROWS, which ``shuffled`` then mixes row by row
    runs = np.random.default_rng(seed).permutation(-(-n // RUN_ROWS)).astype(np.int64)
    order = (runs[:, None] * RUN_ROWS + np.arange(RUN_ROWS)).ravel()
    order = order[order < n]
    return {k: np.take(v, order, axis=0) for k, v in out.items()}


def shuffled(chunks: Iterable[dict], batch_size: int, buffer_rows: int, seed: int) -> Iterator[dict]:
    """Batches of ``batch_size`` rows drawn at random from a buffer of ``buffer_rows`` rows that ``chunks`` (dicts
    of equal-length tensors) refill; the rows left at the end too, the last batch partial.

    Ray Data's ``local_shuffle_buffer_size`` does the same at a cost the training process pays: on meta-v2 (2-core
    VM) its 65,536-row buffer passed 3.1-3.5M rows/s, this one 7.8-8.6M at 262,144 rows, none 11.5M. Here a
    refill moves the rows by one permutation of the pool (``bench/stream_throughput.py`` compares both)."""
    gen, pool = torch.Generator().manual_seed(seed), None

    def permuted(pool: dict) -> dict:  # numpy's take: 10 ns per row of x, torch's x[order] 61, index_select 19
        n = len(pool["y"])
        order = torch.randperm(n, generator=gen, dtype=torch.int32 if n < 2**31 else torch.int64).numpy()
        return {k: torch.from_numpy(np.take(v.numpy(), order, axis=0)) for k, v in pool.items()}

    for chunk in chunks:
        pool = chunk if pool is None else {k: torch.cat([pool[k], v]) for k, v in chunk.items()}
        n = len(pool["y"])
        if n >= buffer_rows + batch_size:
            pool, out = permuted(pool), (n - buffer_rows) // batch_size * batch_size  # >= buffer_rows rows stay
            yield from ({k: v[i : i + batch_size] for k, v in pool.items()} for i in range(0, out, batch_size))
            pool = {k: v[out:] for k, v in pool.items()}
    if pool is not None and len(pool["y"]):
        pool = permuted(pool)
        yield from ({k: v[i : i + batch_size] for k, v in pool.items()} for i in range(0, len(pool["y"]), batch_size))


def epoch_batches(shard, batch_size: int, buffer_rows: int, seed: int, device="cpu") -> Iterator[dict]:
    """One epoch of a training worker's batches on ``device``: its Ray Data shard (``to_rows``' rows) through
    ``shuffled``, which runs on the CPU."""
    chunks = shard.iter_torch_batches(batch_size=max(batch_size, buffer_rows), device="cpu")
    for batch in shuffled(chunks, batch_size, buffer_rows, seed):
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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

    def merged(self, device) -> "ErrorSums":
        """These sums added over the process group's ranks, each of which validated its own split of the windows
        (``Ingest``); the tensor lives on ``device`` (NCCL reduces CUDA tensors only)."""
        import torch.distributed as dist

        keys = list(self.sums)
        total = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        self.sums = dict(zip(keys, total.tolist()))
        return self

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
def validation_metrics(models: dict, batches, across_ranks: bool = False) -> dict[str, float]:
    """``ErrorSums.metrics`` of ``models`` over validation ``batches``: run on the workers at each epoch end and
    on the driver to re-validate the champion on this run's validation set. ``across_ranks``: ``batches`` are
    this rank's split, and the metrics are those of every rank's batches together."""
    errors, layouts = ErrorSums(), {}
    for batch in batches:
        x, y, rms, kind = batch["x"].float(), batch["y"].float(), batch["rms"].float(), batch["kind"]
        for k, model in models.items():
            mask = kind == KIND_IDS[k]
            if mask.any():
                if k not in layouts:  # built once per call (meta-v2's validation windows: 2.3 s through
                    layouts[k] = predict.stepper(model, x)  # KNOWN.step, 0.7 s through the native kernel)
                layout, chunk = layouts[k]
                errors.add(k, x[mask], y[mask], layout.step(x[mask], rms[mask], chunk))
    if across_ranks:
        errors.merged(next(next(iter(models.values())).parameters()).device)
    return errors.metrics()


def best_checkpoint(results: list[tuple]) -> tuple:
    """The (checkpoint, metrics) with the lowest ``METRIC`` among Ray Train's ``best_checkpoints``: only the
    epoch-end reports carry it; a mid-epoch checkpoint (the latest, kept for resuming) never wins."""
    scored = [(c, m) for c, m in results if math.isfinite(m.get(METRIC, math.nan))]
    if not scored:
        raise ValueError(f"no checkpoint with a finite {METRIC}: did any epoch finish?")
    return min(scored, key=lambda cm: cm[1][METRIC])


@dataclass
class Progress:
    """Where a checkpoint stands: ``batches`` of epoch ``epoch`` trained (0 at an epoch's end), ``step`` steps in
    all, and that epoch's running train metrics (kind -> [Σ loss, Σ beyond ±1, rows]; [Σ sweeps per batch, batches]),
    so a run resumed mid-epoch skips the batches it trained and still reports the whole epoch."""

    epoch: int = 0
    step: int = 0
    batches: int = 0
    sums: dict = field(default_factory=lambda: {k: [0.0, 0.0, 0] for k in PREDICTED_KINDS})
    mixing: list = field(default_factory=lambda: [0.0, 0])

    def next_epoch(self) -> "Progress":
        return Progress(self.epoch + 1, self.step)


def _checkpoint_dir(models, opt, progress: Progress, d: str) -> str:
    registry.save_dir(models, d)
    torch.save(opt.state_dict(), Path(d) / OPTIMIZER_FILE)
    (Path(d) / PROGRESS_FILE).write_text(json.dumps(asdict(progress)))
    return d


def restore(models: dict, opt: torch.optim.Optimizer, d: str, device="cpu") -> Progress:
    """Load a checkpoint folder written by ``_checkpoint_dir`` into ``models`` (in place: an ``Objective``'s
    parameters see it) and ``opt`` (``optimizer``); its ``Progress`` (older checkpoints kept no batch count: their
    epoch restarts)."""
    for k, m in registry.load_dir(d).items():
        if m.inputs != models[k].inputs:  # same weights, other inputs: resuming would train nonsense
            raise ValueError(f"checkpoint {d} holds a {k} KNOWN with inputs={m.inputs!r}; this run trains "
                             f"inputs={models[k].inputs!r}: start a new --name")
        models[k].load_state_dict(m.state_dict())
    if (Path(d) / OPTIMIZER_FILE).exists():
        opt.load_state_dict(torch.load(Path(d) / OPTIMIZER_FILE, map_location=device, weights_only=True))
    else:  # a checkpoint of the per-kind optimisers (before the flat parameter)
        old = torch.load(Path(d) / "optimizers.pt", map_location=device, weights_only=True)
        opt.load_state_dict(_flat_adam_state([old[k] for k in models], opt))
    return Progress(**json.loads((Path(d) / PROGRESS_FILE).read_text()))


def _flat_adam_state(per_kind: list[dict], opt: torch.optim.Optimizer) -> dict:
    """The state of one Adam per kind (each over its KNOWN's tensors) as the state of ``opt``, the Adam of their
    flat parameter: the moments laid end to end in the same order, so an older checkpoint resumes exactly."""
    states = [s["state"] for s in per_kind]
    group = {**opt.state_dict()["param_groups"][0], "lr": per_kind[0]["param_groups"][0]["lr"]}
    if not all(states):  # saved before any step
        return {"state": {}, "param_groups": [group]}

    def cat(key: str) -> torch.Tensor:
        return torch.cat([s[i][key].reshape(-1) for s in states for i in sorted(s)])

    moments = {"exp_avg": cat("exp_avg"), "exp_avg_sq": cat("exp_avg_sq")}
    if len(moments["exp_avg"]) != opt.param_groups[0]["params"][0].numel():  # a tensor without state: cannot align
        raise ValueError(f"the checkpoint's optimiser state covers {len(moments['exp_avg'])} parameters, the KNOWNs "
                         f"have {opt.param_groups[0]['params'][0].numel()}: start a new --name")
    return {"state": {0: {"step": states[0][0]["step"], **moments}}, "param_groups": [group]}


def optimizer(objective: "Objective", lr: float) -> torch.optim.Optimizer:
    """Adam over the objective's flat parameter: one fused update per step (per tensor, the 78 tensors of three
    KNOWNs cost more than the native kernel's pass over a batch; torch's profiler on train_step)."""
    return torch.optim.Adam([objective.flat], lr=lr, fused=True)


class Objective(nn.Module):
    """Every kind's training loss on one batch, as one module over one flat parameter: DDP allreduces it once
    per step, autograd accumulates one gradient and Adam updates one tensor (three DDP wrappers made a
    two-worker step 1.6x slower than none; 78 tensors' accumulation and update cost 3 of a 7.6 ms step).

    The KNOWNs in ``models`` keep their parameters, as views of ``flat``: they are what is checkpointed,
    validated and registered, and see every update, also after the Objective is moved or converted.
    On the CPU the native kernel (known/native.py) takes the whole batch in one call, rows grouped by kind, on
    ``threads`` threads; elsewhere each kind's network runs in torch on its part of ``flat``."""

    def __init__(self, models: dict, threads: int = 1):
        super().__init__()
        modes = {m.inputs for m in models.values()}
        if len(modes) != 1:
            raise ValueError(f"the kinds' KNOWNs read different input modes {sorted(modes)}: train one mode at a time")
        self.models = dict(models)  # a plain dict, not submodules: the trained parameter is ``flat``
        self.threads = threads
        params = [p for m in models.values() for p in m.parameters()]
        self.flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
        self.sizes = [sum(p.numel() for p in m.parameters()) for m in models.values()]
        self._share()

    def _parts(self, flat: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per KNOWN, {parameter name: its view of ``flat``} (the parameter, or its detached data)."""
        out = []
        for model, part in zip(self.models.values(), flat.split(self.sizes)):
            named = list(model.named_parameters())
            out.append({n: v.view_as(p) for (n, p), v in zip(named, part.split([p.numel() for _, p in named]))})
        return out

    def _share(self) -> None:
        """Point every KNOWN tensor at its part of ``flat``."""
        for model, views in zip(self.models.values(), self._parts(self.flat.detach())):
            for name, p in model.named_parameters():
                p.data = views[name]

    def _apply(self, fn, recurse=True):  # .to() / .double() / .cuda() replace ``flat``: the KNOWNs must follow it
        out = super()._apply(fn, recurse)
        self._share()
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor, rms: torch.Tensor, kind: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(Σ of the kinds' mean L1 losses, kind -> (loss, fraction beyond ±1, rows)) for the kinds in the batch."""
        rows = [torch.nonzero(kind == KIND_IDS[k]).flatten() for k in self.models]
        order, counts = torch.cat(rows), [len(r) for r in rows]  # rows grouped by kind, in the models' order
        x, y, rms = (v.index_select(0, order) for v in (x, y, rms))  # x[order]: 61 ns per row, this 19
        inputs, centre, scale = next(iter(self.models.values())).prepare(x, rms)
        t = (y - centre) / scale
        if all(native.runs(inputs, m) for m in self.models.values()):
            losses = native.l1(self.flat, self.sizes, inputs, t.clamp(-1, 1), counts, self.threads)
        else:
            losses = self._torch(inputs, t.clamp(-1, 1), counts)
        beyond = (t.abs() > 1).float().split(counts)
        out = {k: (losses[i].detach(), beyond[i].mean(), n) for i, (k, n) in enumerate(zip(self.models, counts)) if n}
        return losses.sum(), out

    def _torch(self, inputs: torch.Tensor, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each kind's mean L1 in torch, its KNOWN called with its part of ``flat`` (autograd reaches ``flat``)."""
        losses = []
        for model, params, x_k, t_k in zip(self.models.values(), self._parts(self.flat), inputs.split(counts),
                                           t.split(counts)):
            residual = torch.func.functional_call(model, params, (x_k,))
            losses.append((residual - t_k).abs().mean() if len(t_k) else self.flat.new_zeros(()))
        return torch.stack(losses)


def train_step(objective: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> dict[str, tuple[float, float, int]]:
    """One optimisation step of every kind's KNOWN on its rows of ``batch`` (``objective``: an ``Objective``, or
    its DDP wrapper; ``opt``: its ``optimizer``); kind -> (Σ loss, Σ beyond ±1, rows)."""
    x, y, rms, kind = batch["x"].float(), batch["y"].float(), batch["rms"].float(), batch["kind"]
    opt.zero_grad(set_to_none=True)
    total, out = objective(x, y, rms, kind)
    total.backward()  # each kind's loss reaches only its own part of the flat parameter
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
    device = get_device()  # batches are moved to it (CUDA when the worker has a GPU)
    models = {k: m.to(device) for k, m in registry.fresh(cfg["seed"], cfg["inputs"]).items()}
    objective = Objective(models, threads=cfg.get("threads", 1))
    opt = optimizer(objective, cfg["lr"])
    progress = Progress()
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resume: weights, optimiser state and progress of the last checkpoint
        with ckpt.as_directory() as d:
            progress = restore(models, opt, d, device)
    resumed_from = progress.step  # reported with every metric, so a resumed run is visible as one
    if ctx.get_world_size() > 1:
        from ray.train.torch import prepare_model

        objective = prepare_model(objective)
    mlflow = MlflowClient(cfg["tracking_uri"]) if ctx.get_world_rank() == 0 and cfg.get("run_id") else None

    def report(metrics: dict, at: Progress) -> None:
        if mlflow:
            now = int(time.time() * 1000)  # MLflow's wall-time axis: a timestamp of 0 would put the run in 1970
            mlflow.log_batch(cfg["run_id"], metrics=[Metric(k, float(v), now, at.step) for k, v in metrics.items()])
        with tempfile.TemporaryDirectory() as d:
            ck = ray.train.Checkpoint.from_directory(_checkpoint_dir(models, opt, at, d)) if ctx.get_world_rank() == 0 else None
            ray.train.report({**metrics, RANK: metrics.get(METRIC, UNMEASURED), "step": at.step, "epoch": at.epoch,
                              "resumed_from_step": resumed_from}, checkpoint=ck)

    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    def train_metrics(p: Progress) -> dict:
        out = {f"train_l1_{k}": s / max(n, 1) for k, (s, _, n) in p.sums.items()}
        out |= {f"train_beyond_range_{k}": o / max(n, 1) for k, (_, o, n) in p.sums.items()}
        return out | {"sweeps_per_batch": p.mixing[0] / max(p.mixing[1], 1)}  # distinct sweeps in a batch

    while progress.epoch < cfg["epochs"]:
        batches = epoch_batches(train_shard, cfg["batch_size"], cfg["shuffle_buffer"], cfg["seed"] + progress.epoch, device)
        for batch in itertools.islice(batches, progress.batches, None):  # those before a resumed checkpoint: skipped
            for k, got in train_step(objective, opt, batch).items():
                progress.sums[k] = [a + b for a, b in zip(progress.sums[k], got)]
            progress.mixing = [progress.mixing[0] + len(torch.unique(batch["sweep"])), progress.mixing[1] + 1]
            progress.step, progress.batches = progress.step + 1, progress.batches + 1
            if progress.step % cfg["checkpoint_every"] == 0:
                report(train_metrics(progress), progress)
        val = validation_metrics(models, val_shard.iter_torch_batches(batch_size=cfg["batch_size"]),
                                 across_ranks=ctx.get_world_size() > 1)  # each rank validated its split (Ingest)
        metrics = {**train_metrics(progress), **val}
        progress = progress.next_epoch()
        report(metrics, progress)


def training_rows(done: list[dict], keep_unlearned: bool = False) -> list[dict]:
    """The done catalog rows to meta-train on: a Θ0 that never learned has nothing to forget."""
    return [r for r in done if keep_unlearned or learned(r["stage_test_acc"][0])]


def split(rows: list[dict], val_fraction: float, train_fraction: float = 1.0) -> tuple[set[str], set[str]]:
    """(train ids, validation ids). ``train_fraction`` keeps a nested, deterministic part of the training
    sweeps (a size curve: ¼ ⊂ ½ ⊂ all) and never changes the validation sweeps."""
    val = {r["sweep_id"] for r in rows if is_validation(r["sweep_id"], val_fraction)}
    train = {r["sweep_id"] for r in rows if r["sweep_id"] not in val and is_validation("train:" + r["sweep_id"], train_fraction)}
    return train, val


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
    p.add_argument("--inputs", choices=INPUT_MODES, default="rms", help="KNOWN's input mode (known.model): raw "
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

    digest = registry.catalog_sha256(args.collection)
    used = [r for r in rows if r["sweep_id"] in train_ids | val_ids]
    df = pd.DataFrame({"sweep_id": [r["sweep_id"] for r in used], "family": [r["family"] for r in used],
                       "dataset": [r["dataset"] for r in used],
                       "split": ["validation" if r["sweep_id"] in val_ids else "train" for r in used]})
    mlflow.log_input(mlflow.data.from_pandas(df, source=storage.normalize(args.collection), name="meta-dataset",
                                             digest=digest[:32]), context="training", tags={"catalog_sha256": digest})
    mlflow.log_dict({split: registry.by_family_dataset([r for r in used if (r["sweep_id"] in val_ids) == (split == "validation")])
                     for split in ("train", "validation")}, "sweeps_by_family_dataset.json")
    return {"catalog_sha256": digest, registry.VAL_DIGEST: validation_digest(val_ids), "shards": args.collection}


def _start_run(args):
    """A new MLflow run, or the one an earlier training under the same --storage / --name started."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = stored_run_id(args)
    if run_id:
        try:
            return mlflow.start_run(run_id=run_id, log_system_metrics=args.system_metrics), True
        except MlflowException as e:
            log.warning("run %s of %s/%s not in this tracking store (%s): starting a new one", run_id, args.storage, args.name, e)
    run = mlflow.start_run(run_name=args.name, log_system_metrics=args.system_metrics)
    store_run_id(args, run.info.run_id)
    return run, False


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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from known.ingest import Ingest

    def dataset(ids, sweeps_per_block, repeat=None):
        return readers.ray_dataset(args.collection, where=lambda r: r["sweep_id"] in ids,
                                   shuffle=FileShuffleConfig(seed=args.seed)).map_batches(
            to_rows, batch_size=sweeps_per_block, fn_kwargs={"seed": args.seed, "repeat": repeat})

    cfg = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "inputs": args.inputs,
           "threads": max(1, int(args.cpus_per_worker)),  # the native kernel's threads: the CPUs the worker reserved
           "shuffle_buffer": args.shuffle_buffer, "checkpoint_every": args.checkpoint_every,
           "tracking_uri": uri, "run_id": run_id}
    val = dataset(val_ids, 1)  # every scalar once; a block per sweep, so that the workers can share the validation
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg,
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
