"""The forgetting sweep ("controlled forgetting", the paper's sequential fine-tuning).

Θ0 is trained from initialisation on D0; Θk fine-tunes Θk−1 on Dk ⊂ Dk−1 with |Dk| = round(r·|Dk−1|)
(or, with ``stage_init: restart``, trains from the same initial weights on Dk, as the released collector).
Every parameter and buffer is snapshotted after each stage, with the stage's metrics. One function, read
top to bottom; everything random comes from the spec's seed.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import get_args

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from collectors import __version__, data, fastpath, zoo
from collectors.augment import crop_flip
from collectors.config import DEFAULT_SWEEP_PATH, SweepPath, SweepSpec, stage_sizes
from meta.record import FORMAT_VERSION, SweepRecord, utc_now


PATHS = get_args(SweepPath)
"""How a sweep's steps run. ``reference``: the plain NCHW loop (every sweep collected before this path existed, and
the evaluation's pre-training, whose cached trajectories it keeps reproducible). ``fast``: activations and kernels
channels-last, oneDNN's native CPU layout, with its one leak mended and a tuned allocator (``collectors.fastpath``),
foreach optimiser updates and evaluation in cache-sized batches; the
same protocol and random draws, so the two differ by float rounding only (tests/test_sweep_path.py). Measured in
docs/collection.md#sweep-speed."""
EVAL_BATCH = {"reference": 1000, "fast": 128}


class SweepDiverged(RuntimeError):
    """Loss or weights became NaN/inf; the sweep is recorded as failed and never written."""


@dataclass
class StageMetrics:
    stage: int
    subset_size: int
    steps: int
    train_loss: float  # mean over the stage's last epoch
    train_acc: float
    test_loss: float
    test_acc: float  # on the test set (all of it unless the spec says test_size)
    wall_s: float


@dataclass
class SweepResult:
    spec: SweepSpec
    stages: list[StageMetrics]
    tensors: dict[str, torch.Tensor]  # state-dict name -> [L, *shape], stage 0 (most data) first
    kinds: dict[str, str]  # state-dict name -> conv / linear / bias / norm / buffer
    n_params: int
    wall_s: float
    path: str = "reference"  # PATHS: which loop made it
    finished_at: str | None = None  # ISO time (UTC) its training ended

    def stage_dicts(self) -> list[dict]:
        return [asdict(m) for m in self.stages]


@dataclass(frozen=True)
class StagePlan:
    """How one stage trains: epochs on its subset, a fresh optimiser at ``lr``, optionally cosine-decayed;
    with ``plateau``, ``epochs`` is a cap, the rate stays constant until the training loss plateaus
    (``plateaued``), and ``cosine`` then decays it to zero over as many epochs again."""

    epochs: int
    lr: float
    cosine: bool = False
    plateau: bool = False
    follow: bool = False  # as many epochs as the stage before took (after a plateau: as long as Θ0 trained)


PLATEAU_PATIENCE, PLATEAU_TOL, PLATEAU_FLOOR = 3, 0.02, 0.005


def stage_plans(theta0: str, first: StagePlan, rest: StagePlan, n_stages: int) -> list[StagePlan]:
    """Θ0's plan then the stages'. ``theta0`` plateau: Θ0 at a constant rate until its loss plateaus (``first``'s
    epochs the cap), and stages as long as that cap follow Θ0's plateau length; plateau-anneal: then Θ0's rate
    cosine-decays over that many epochs again. One rule for the collection and the evaluation's pre-training,
    so their sweeps are the same protocol."""
    if theta0 in ("plateau", "plateau-anneal"):
        first = replace(first, cosine=theta0 == "plateau-anneal", plateau=True)
        rest = replace(rest, follow=rest.epochs == first.epochs)
    return [first] + [rest] * (n_stages - 1)


def plateaued(losses: list[float], patience: int = PLATEAU_PATIENCE, tol: float = PLATEAU_TOL,
              floor: float = PLATEAU_FLOOR) -> bool:
    """The training loss has plateaued when the best of its last ``patience`` epochs improves on the best
    before them by less than ``tol`` of it, or by less than ``floor`` in absolute terms (a loss near zero
    still halves, but nothing is left to learn). Θ0 stopped this way is trained as far as its data allows,
    so a later stage forgets rather than keeps training it."""
    if len(losses) <= patience:
        return False
    before, recent = min(losses[:-patience]), min(losses[-patience:])
    return before - recent < max(tol * before, floor)


@dataclass(frozen=True)
class Protocol:
    """How a sweep's stages relate (the spec's protocol fields, resolved): ``augment`` is the generator that
    draws the crops and flips, None for no augmentation."""

    restart: bool = False
    carry_optimizer: bool = False
    augment: torch.Generator | None = None
    weight_decay: float = 0.0  # decoupled (AdamW); 0: plain Adam

    @classmethod
    def of(cls, spec: SweepSpec, seed: int | None = None) -> Protocol:
        """The protocol of ``spec`` (or of anything with its protocol fields, seeded by ``seed``)."""
        seed = spec.seed if seed is None else seed
        aug = torch.Generator().manual_seed(seed + 3) if spec.augment == "crop_flip" else None
        return cls(spec.stage_init == "restart", spec.optimizer_state == "carry", aug, spec.weight_decay)


def _optimizer(name: str, model: nn.Module, lr: float, foreach: bool | None = None,
               weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``foreach=None`` is torch's default: on the CPU a loop over the parameters. A ``weight_decay`` is
    decoupled: Adam becomes AdamW (plain Adam where it is 0, so earlier sweeps replay exactly)."""
    if name == "adam" and weight_decay:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=foreach)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, foreach=foreach)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, foreach=foreach)


def _stage_optimizer(name: str, model: nn.Module, lr: float, carried: torch.optim.Optimizer | None, path: str,
                     weight_decay: float = 0.0):
    """A fresh optimiser (each stage its own fine-tune), or ``carried`` with its moments kept and its
    learning rate set back to ``lr`` (a cosine schedule of the previous stage left it near zero)."""
    if carried is None:
        return _optimizer(name, model, lr, foreach=True if path == "fast" else None, weight_decay=weight_decay)
    for group in carried.param_groups:
        group["lr"] = group["initial_lr"] = lr
    return carried


def cosine_schedule(opt, epochs: int, n: int, batch_size: int):
    """Cosine decay to zero over ``epochs`` passes of ``n`` examples, stepped once per batch."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs * math.ceil(n / batch_size), 1))


def for_path(model: nn.Module, path: str, dataset: str, images: torch.Tensor) -> nn.Module:
    """``model`` laid out for ``path``: the fast path's channels-last layout (``collectors.fastpath``), found with
    two of ``images`` (uint8, as the split holds them); the reference path's as built."""
    if path == "fast":
        fastpath.prepare(model, _inputs(dataset, images[:2], path))
    return model


def _inputs(dataset: str, x: torch.Tensor, path: str) -> torch.Tensor:
    """A batch of uint8 images as the model takes them on ``path``."""
    x = data.normalize(dataset, x)
    return x.contiguous(memory_format=torch.channels_last) if path == "fast" else x


def train_epochs(model, opt, split, idx, dataset, batch_size, epochs, gen, sched=None, bn_frozen=False,
                 augment: torch.Generator | None = None, path: str = "reference") -> tuple[int, float, float]:
    """``epochs`` passes over the examples ``idx`` of ``split``; returns (steps, loss, acc) of the last pass.

    ``sched`` steps after every batch; ``bn_frozen`` keeps the model in eval mode (BatchNorm statistics
    fixed, as when only a new head is trained on frozen features); ``augment``, a generator, crops and flips
    every batch with it (``collectors.augment``)."""
    model.train(not bn_frozen)
    steps = 0
    for _ in range(epochs):
        order = idx[torch.randperm(len(idx), generator=gen)]
        loss_sum, correct = 0.0, 0
        for start in range(0, len(order), batch_size):
            b = order[start : start + batch_size]
            xb = split.x[b] if augment is None else crop_flip(split.x[b], augment)
            xb, yb = _inputs(dataset, xb, path), split.y[b]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            if not torch.isfinite(loss):
                raise SweepDiverged(f"loss became {loss.item()} at step {steps + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched:
                sched.step()
            steps += 1
            loss_sum += loss.item() * len(b)
            correct += (logits.argmax(1) == yb).sum().item()
    return steps, loss_sum / len(idx), correct / len(idx)


def train_stages(
    model: nn.Module,
    train: data.Split,
    test: data.Split,
    subsets: list[torch.Tensor],
    plans: list[StagePlan],
    *,
    dataset: str,
    optimizer: str,
    batch_size: int,
    gen: torch.Generator,
    record: bool = True,
    on_stage: Callable[[StageMetrics], None] | None = None,
    protocol: Protocol | None = None,
    path: str = "reference",
) -> tuple[list[StageMetrics], list[dict[str, torch.Tensor]]]:
    """Train ``model`` on each subset in turn (stage k on ``subsets[k]`` with ``plans[k]``), evaluating and
    snapshotting after each stage. The collector's sweep and the evaluation's pre-training both run this.

    ``protocol`` (default: sequential stages, a fresh optimiser each, no augmentation) says how the stages
    relate: restart puts the initial weights back before every stage; carry keeps one optimiser. ``path`` is
    one of PATHS."""
    if path not in PATHS:
        raise ValueError(f"unknown sweep path {path!r}; known: {list(PATHS)}")
    protocol = protocol or Protocol()
    for_path(model, path, dataset, train.x)
    initial = {k: v.clone() for k, v in model.state_dict().items()} if protocol.restart else None
    stages: list[StageMetrics] = []
    snaps: list[dict[str, torch.Tensor]] = []
    opt, epochs = None, 0
    for k, (idx, plan) in enumerate(zip(subsets, plans, strict=True)):
        t0 = time.perf_counter()
        if initial is not None:
            model.load_state_dict(initial)
        opt = _stage_optimizer(optimizer, model, plan.lr, opt if protocol.carry_optimizer else None, path,
                               protocol.weight_decay)
        epochs = epochs if plan.follow else plan.epochs
        steps, tr_loss, tr_acc, epochs = _train_stage(model, opt, plan, epochs, train, idx, dataset, batch_size, gen,
                                                      protocol.augment, path)
        te_loss, te_acc = evaluate(model, dataset, test, path=path)
        if not math.isfinite(te_loss):
            raise SweepDiverged(f"test loss became {te_loss} at stage {k}")
        if record:
            snaps.append(_snapshot(model))
        m = StageMetrics(k, len(idx), steps, tr_loss, tr_acc, te_loss, te_acc, time.perf_counter() - t0)
        stages.append(m)
        if on_stage:
            on_stage(m)
    return stages, snaps


def _train_stage(model, opt, plan: StagePlan, epochs: int, train, idx, dataset, batch_size, gen, augment,
                 path) -> tuple[int, float, float, int]:
    """One stage's training, ``epochs`` long (cosine-decayed where the plan says) or until its loss plateaus
    (then annealed over as many epochs where the plan says); (steps, loss, acc) of its last epoch and the epochs
    a following stage copies (the plateau's)."""
    plateau_steps = 0
    if plan.plateau:
        plateau_steps, loss, acc, epochs = _until_plateau(model, opt, train, idx, dataset, batch_size, epochs, gen,
                                                          augment, path)
        if not plan.cosine:
            return plateau_steps, loss, acc, epochs
    sched = cosine_schedule(opt, epochs, len(idx), batch_size) if plan.cosine else None
    steps, loss, acc = train_epochs(model, opt, train, idx, dataset, batch_size, epochs, gen, sched, augment=augment, path=path)
    return plateau_steps + steps, loss, acc, epochs


def _until_plateau(model, opt, train, idx, dataset, batch_size, cap, gen, augment, path) -> tuple[int, float, float, int]:
    """Epochs at a constant rate until the training loss ``plateaued`` or ``cap`` epochs; (steps, loss, acc,
    epochs) of the last."""
    losses, steps = [], 0
    while len(losses) < cap and not plateaued(losses):
        n, loss, acc = train_epochs(model, opt, train, idx, dataset, batch_size, 1, gen, augment=augment, path=path)
        steps += n
        losses.append(loss)
    return steps, loss, acc, len(losses)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: str, split: data.Split, batch: int | None = None,
             path: str = "reference") -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``split``, in eval mode, ``batch`` images at a time (default: the
    path's; the fast path's 128 keep the activations in cache, 2-3x faster than 1,000 for CIFAR-10 models)."""
    batch = batch or EVAL_BATCH[path]
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(split), batch):
        xb = _inputs(dataset, split.x[start : start + batch], path)
        yb = split.y[start : start + batch]
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return loss_sum / len(split), correct / len(split)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    snap = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    bad = [k for k, v in snap.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SweepDiverged(f"non-finite values in {bad[:3]}{'…' if len(bad) > 3 else ''}")
    return snap


def nested_subsets(n_train: int, size: int | None, r: float, n_stages: int, seed: int) -> list[torch.Tensor]:
    """Indices of D0 ⊃ D1 ⊃ … ⊃ D_{L-1}: D0 a random ``size`` subset (None: all), each next a random r-fraction."""
    gen = torch.Generator().manual_seed(seed)
    subsets = [torch.randperm(n_train, generator=gen)[: size or n_train]]
    for n in stage_sizes(len(subsets[0]), r, n_stages)[1:]:
        prev = subsets[-1]
        subsets.append(prev[torch.randperm(len(prev), generator=gen)[:n]])
    if len(subsets[-1]) < 1:
        raise ValueError(f"|D0|={len(subsets[0])} with r={r} leaves an empty D{n_stages - 1}")
    return subsets


def test_split(spec: SweepSpec, test: data.Split) -> data.Split:
    """The test images a sweep is evaluated on: all, or a seeded random ``test_size`` of them."""
    if spec.test_size is None or spec.test_size >= len(test):
        return test
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(spec.seed + 2))[: spec.test_size]
    return data.Split(test.x[idx], test.y[idx])


def run_sweep(
    spec: SweepSpec,
    settings: data.DataSettings,
    *,
    record: bool = True,
    on_stage: Callable[[StageMetrics], None] | None = None,
    path: str = DEFAULT_SWEEP_PATH,
) -> SweepResult:
    """Run one forgetting sweep on ``path`` (PATHS). ``record=False`` trains identically but keeps no snapshots
    (benchmarks)."""
    t_start = time.perf_counter()
    info = data.DATASETS[spec.dataset]
    train, test = data.load(spec.dataset, settings, True), data.load(spec.dataset, settings, False)
    if spec.train_size is not None and spec.train_size > len(train):
        raise data.DataError(f"train_size={spec.train_size} exceeds the {len(train)} training images of {spec.dataset}")

    torch.manual_seed(spec.seed)
    model = zoo.build(spec.family, spec.arch, info.channels, info.num_classes)
    kinds = zoo.tensor_kinds(model)

    subsets = nested_subsets(len(train), spec.train_size, spec.r, spec.n_stages, spec.seed)
    test = test_split(spec, test)
    gen = torch.Generator().manual_seed(spec.seed + 1)  # batch order
    cosine = spec.schedule == "cosine"
    plans = stage_plans(spec.theta0, StagePlan(spec.pretrain_epochs, spec.lr, cosine),
                        StagePlan(spec.stage_epochs, spec.lr, cosine), spec.n_stages)
    stages, snaps = train_stages(model, train, test, subsets, plans, dataset=spec.dataset, optimizer=spec.optimizer,
                                 batch_size=spec.batch_size, gen=gen, record=record, on_stage=on_stage,
                                 protocol=Protocol.of(spec), path=path)

    tensors = {name: torch.stack([s[name] for s in snaps]) for name in kinds} if record else {}
    return SweepResult(spec, stages, tensors, kinds, zoo.n_params(model), time.perf_counter() - t_start, path,
                       utc_now())


def to_record(result: SweepResult) -> dict:
    """The JSON record stored beside the tensors: enough to rebuild the catalog row and re-run the sweep."""
    spec = result.spec
    return SweepRecord.model_validate({
        "format": FORMAT_VERSION,
        "sweep_id": spec.sweep_id,
        "spec": spec.model_dump(mode="json"),
        "n_stages": spec.n_stages,
        "n_params": result.n_params,
        "stages": result.stage_dicts(),
        "wall_s": result.wall_s,
        "path": result.path,
        "finished_at": result.finished_at,
        "tensors": [
            {"name": k, "shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch."), "kind": result.kinds[k]}
            for k, v in result.tensors.items()
        ],
        "versions": {"oblivion": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "python": platform.python_version()},
    }).model_dump(mode="json")
