"""What meta-training optimises and how it is measured: every kind's L1 loss as one module over one flat
parameter (``Objective``, ``train_step``), and the pooled relative L1 on validation windows (``ErrorSums``:
Σ|error| / Σ|Θk+1 − Θk| per kind and method, summed over windows before the ratio)."""

from __future__ import annotations

import torch
from torch import nn

from known import native, predict, registry
from known.fast import NativeKNOWN
from known.model import PREDICTED_KINDS
from known.relative_l1 import STEP, PooledL1
from known.windows import KIND_IDS

METRIC = registry.METRIC


class ErrorSums(PooledL1):
    """The pooled relative L1 (``known.relative_l1``) of KNOWN and two baselines per kind on validation windows."""

    METHODS = ("known", "taskvector", "linearfit")

    def __init__(self):
        super().__init__((k, m) for k in PREDICTED_KINDS for m in (*self.METHODS, STEP))

    def add_windows(self, kind: str, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor) -> None:
        """Add one kind's validation windows ``x`` with targets ``y`` and KNOWN's predictions ``pred``."""
        self.add(kind, "known", pred, y)
        for m in ("taskvector", "linearfit"):
            step, chunk = predict.stepper(m, x)
            self.add(kind, m, step.step(x, None, chunk), y)
        self.add(kind, STEP, x[:, -1], y)

    def metrics(self) -> dict[str, float]:
        out = {}
        for m in self.METHODS:
            out[f"val_rel_l1_{m}"] = self.ratio(m, PREDICTED_KINDS)
            for k in PREDICTED_KINDS:
                out[f"val_rel_l1_{m}_{k}"] = self.ratio(m, [k])
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
                errors.add_windows(k, x[mask], y[mask], layout.step(x[mask], rms[mask], chunk))
    if across_ranks:
        errors.all_reduced(next(next(iter(models.values())).parameters()).device)
    return errors.metrics()


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
        if all(predict.layout(inputs, m) is NativeKNOWN for m in self.models.values()):  # the kernel's loss, else autograd
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
