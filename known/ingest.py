"""How the training job's datasets reach its Ray Train workers."""

from __future__ import annotations

from ray.train import DataConfig


class Ingest(DataConfig):
    """Training windows split equally among the workers (DDP's ranks step together; Ray drops the remainder);
    validation windows split without dropping any: each worker validates its split and
    ``known.objective.validation_metrics`` adds the ranks' sums. Each worker used to validate every window, so N
    workers did N times the work."""

    def __init__(self):
        super().__init__(datasets_to_split=["train", "val"])

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out = super().configure({k: v for k, v in datasets.items() if k != "val"}, world_size, worker_handles,
                                worker_node_ids, **kwargs)
        if "val" in datasets:
            ds = datasets["val"].copy(datasets["val"])
            ds.context.execution_options = self._resolve_execution_options("val")
            splits = ([ds.iterator()] if world_size == 1 else
                      ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids))
            for i, split in enumerate(splits):
                out[i]["val"] = split
        return out
