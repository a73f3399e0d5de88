"""Task data and the downstream fine-tune: a head-only phase (how good are the features), then full
fine-tuning with cosine decay (the official code's protocol). One function, read top to bottom."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from collectors import data, zoo
from collectors.sweep import cosine_schedule, evaluate, for_path, train_epochs
from evaluation.config import Downstream, Task, Tuning
from known.predict import reestimate_bn


def task_indices(task: Task, labels: torch.Tensor, train: bool, seed: int, multiplier: int = 1) -> torch.Tensor:
    """Indices into the dataset split of a seeded random ``train_size`` (× ``multiplier``) / ``test_size``
    of the images of ``task.classes``. One permutation per seed, cut at the size: the ×2 and ×4 oracle sets
    are supersets of D0 by construction."""
    pool = torch.nonzero(torch.isin(labels, torch.tensor(task.classes))).flatten()
    size = task.train_size if train else task.test_size
    if size is None:
        return pool
    size *= multiplier
    if size > len(pool):
        raise data.DataError(f"{task.dataset} classes {task.classes} have {len(pool)} "
                             f"{'training' if train else 'test'} images, fewer than the {size} asked for")
    return pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:size]]


def task_split(task: Task, settings: data.DataSettings, train: bool, seed: int, multiplier: int = 1) -> data.Split:
    """The images of ``task_indices``, labels renumbered 0..n-1 in the order of ``task.classes``."""
    full = data.load(task.dataset, settings, train)
    idx = task_indices(task, full.y, train, seed, multiplier)
    remap = torch.full((int(full.y.max()) + 1,), -1, dtype=torch.int64)
    remap[torch.tensor(task.classes)] = torch.arange(len(task.classes))
    return data.Split(full.x[idx], remap[full.y[idx]])


def head_of(model: nn.Module) -> nn.Linear:
    """The classifier: the last Linear layer of every family in the zoo."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear classifier to replace")
    return linears[-1]


def load_backbone(model: nn.Module, init: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``init`` except the classifier (which stays freshly initialised for the new classes)."""
    head = head_of(model)
    head_names = {n for n, m in model.named_modules() if m is head}
    own = model.state_dict()
    keep = {k: v for k, v in init.items() if k.rsplit(".", 1)[0] not in head_names}
    for k, v in keep.items():
        if k not in own or own[k].shape != v.shape:
            raise ValueError(f"initialisation tensor {k} {tuple(v.shape)} does not fit the downstream model")
    missing = [k for k in own if k not in keep and k.rsplit(".", 1)[0] not in head_names]
    if missing:
        raise ValueError(f"initialisation lacks {missing[:3]}")
    model.load_state_dict({**own, **keep})


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _prepare(model: nn.Module, init: dict[str, torch.Tensor] | None, task: Downstream, train: data.Split) -> None:
    """The backbone from ``init`` (None: scratch), its BatchNorm statistics as the task says."""
    if init is None:
        return
    load_backbone(model, init)
    if task.bn == "reestimate":
        reestimate_bn(model, task.dataset, train.x)
    elif task.bn == "reset":
        for m in batchnorms(model):
            m.reset_running_stats()


def _phase(model: nn.Module, params, lr: float, epochs: int, train: data.Split, task: Downstream, gen: torch.Generator,
           path: str, head_only: bool, curve: dict) -> None:
    """``epochs`` of Adam on ``params`` (cosine-decayed in the full phase), per-epoch train loss / acc into ``curve``."""
    for p in model.parameters():
        p.requires_grad_(not head_only)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = None if head_only else cosine_schedule(opt, epochs, len(train), task.batch_size)
    name = "head" if head_only else "full"
    idx = torch.arange(len(train))
    for _ in range(epochs):
        _, loss, acc = train_epochs(model, opt, train, idx, task.dataset, task.batch_size, 1, gen, sched,
                                    bn_frozen=head_only and not task.head_trains_bn, path=path)
        curve[f"{name}_train_loss"].append(loss)
        curve[f"{name}_train_acc"].append(acc)


def finetune(init: dict[str, torch.Tensor] | None, family: str, arch: dict, task: Downstream,
             settings: data.DataSettings, seed: int, threads: int = 1, path: str = "reference",
             tuning: Tuning | None = None) -> dict:
    """Fine-tune from ``init`` (None: from scratch) on the downstream task with ``seed`` choosing the
    training images, the new head and the batch order. Returns the test accuracy after each phase and
    per-epoch training loss / accuracy (testing every epoch would cost more than the training here).

    With ``tuning`` the last ``tuning.validation`` of the seed's training images are held out, the head phase
    runs once, and the full phase once per learning-rate factor from the same state and batch order:
    ``val_lr`` / ``test_lr`` hold each factor's validation and test accuracy (``acc_full`` is factor 1's),
    so a rate can be selected on validation images alone."""
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    info = data.DATASETS[task.dataset]
    train = task_split(task, settings, True, seed)
    n_val = tuning.validation if tuning else 0
    val = data.Split(train.x[len(train) - n_val:], train.y[len(train) - n_val:])
    train = data.Split(train.x[: len(train) - n_val], train.y[: len(train) - n_val])
    test = task_split(task, settings, False, 0)  # one test set for every seed and method
    torch.manual_seed(seed)
    model = zoo.build(family, arch, info.channels, len(task.classes))
    for_path(model, path, task.dataset, train.x)
    _prepare(model, init, task, train)
    head, gen = head_of(model), torch.Generator().manual_seed(seed)
    curve: dict[str, list[float]] = {k: [] for k in ("head_train_loss", "head_train_acc", "full_train_loss", "full_train_acc")}
    first = list(head.parameters())
    if task.head_trains_bn:  # the released scripts' first phase trains BatchNorm with the head
        first += [p for m in batchnorms(model) for p in m.parameters()]
    _phase(model, first, task.head_lr, task.head_epochs, train, task, gen, path, True, curve)
    acc_head = evaluate(model, task.dataset, test, path=path)[1]
    if tuning is None:
        _phase(model, list(model.parameters()), task.full_lr, task.full_epochs, train, task, gen, path, False, curve)
        acc_full = evaluate(model, task.dataset, test, path=path)[1] if task.full_epochs else acc_head
        return {"acc_head": acc_head, "acc_full": acc_full, **curve, "wall_s": time.perf_counter() - t0}
    after_head, gen_state = copy.deepcopy(model.state_dict()), gen.get_state()
    out = {"val_lr": {}, "test_lr": {}}
    for f in tuning.lr_factors:
        model.load_state_dict(after_head)
        gen.set_state(gen_state)
        per_rate = {k: [] for k in curve}
        _phase(model, list(model.parameters()), task.full_lr * f, task.full_epochs, train, task, gen, path, False, per_rate)
        out["val_lr"][f] = evaluate(model, task.dataset, val, path=path)[1]
        out["test_lr"][f] = evaluate(model, task.dataset, test, path=path)[1]
        if f == 1:
            curve["full_train_loss"], curve["full_train_acc"] = per_rate["full_train_loss"], per_rate["full_train_acc"]
    return {"acc_head": acc_head, "acc_full": out["test_lr"][1.0], **out, **curve, "wall_s": time.perf_counter() - t0}
