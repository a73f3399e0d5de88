"""A simulated sweep: a well-formed result with tiny tensors in about a millisecond, no training.

The test double for ``collectors.sweep.run_sweep`` that ``bench/scale.py`` and the tests hand to
``collectors.collect.collect(runner=…)``: everything around the training (scheduler, policy, shard writer,
catalog, readers) runs for real, at the rate a cluster of thousands of workers would feed it.
"""

from __future__ import annotations

import torch

from collectors.config import SweepSpec, stage_sizes
from collectors.data import DataSettings
from collectors.sweep import StageMetrics, SweepResult

# one tensor of each kind KNOWN predicts: 72 conv, 80 linear and 10 bias scalars
SHAPES = {"conv.weight": ((8, 1, 3, 3), "conv"), "fc.weight": ((10, 8), "linear"), "fc.bias": ((10,), "bias")}


def simulated_sweep(spec: SweepSpec, settings: DataSettings | None = None, *, record: bool = True,
                    on_stage=None, path: str = "reference") -> SweepResult:
    """A sweep of ``spec``'s shape whose weights drift smoothly from a seeded start, one stage after another."""
    gen = torch.Generator().manual_seed(spec.seed)
    sizes = stage_sizes(spec.train_size or 1000, spec.r, spec.n_stages)
    stages = []
    for k, n in enumerate(sizes):
        stages.append(StageMetrics(k, n, 1, 1.0 + 0.1 * k, 0.9 - 0.01 * k, 1.0, 0.9 - 0.01 * k, 0.0))
        if on_stage:
            on_stage(stages[-1])
    tensors = {}
    for name, (shape, _) in SHAPES.items():
        start, drift = torch.randn(shape, generator=gen), 0.01 * torch.randn(shape, generator=gen)
        tensors[name] = torch.stack([start + k * drift for k in range(spec.n_stages)]) if record else None
    return SweepResult(spec, stages, tensors if record else {}, {n: kind for n, (_, kind) in SHAPES.items()},
                       sum(torch.Size(s).numel() for s, _ in SHAPES.values()), 0.001, path)
