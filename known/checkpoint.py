"""Meta-training checkpoints: the KNOWNs' safetensors, the optimiser's state and a ``Progress`` that lets a run
resumed mid-epoch skip the batches it trained; and which of Ray Train's checkpoints is the best."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from known import registry
from known.model import PREDICTED_KINDS
from known.objective import METRIC

# Ray Train keeps the best checkpoints by RANK: METRIC where an epoch end measured it, else UNMEASURED (ranked
# last; a finite number because NaN and inf do not survive Ray's checkpoint snapshot, which a resume reads)
RANK, UNMEASURED = "checkpoint_rank", 1e30
OPTIMIZER_FILE = "optimizer.pt"  # in a checkpoint, next to the KNOWNs' safetensors
PROGRESS_FILE = "progress.json"  # and its ``Progress``


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


def save(models, opt, progress: Progress, d: str) -> str:
    registry.save_dir(models, d)
    torch.save(opt.state_dict(), Path(d) / OPTIMIZER_FILE)
    (Path(d) / PROGRESS_FILE).write_text(json.dumps(asdict(progress)))
    return d


def restore(models: dict, opt: torch.optim.Optimizer, d: str, device="cpu") -> Progress:
    """Load a checkpoint folder written by ``save`` into ``models`` (in place: an ``Objective``'s
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
