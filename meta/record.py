"""The sweep record: the one typed model of what a sweep's JSON says, from the shard to KNOWN and evaluation.

Validated when a shard is decoded (``meta.shards.decode_sample``), so a reader further down never meets a
missing key or a wrong type. The spec stays a mapping here (``collectors.config.SweepSpec`` validates it
where a sweep is re-run); ``protocol`` reads the protocol fields with their pre-protocol defaults.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
# a protocol field missing from a spec or catalog reads as the protocol every sweep had before it existed
LEGACY_PROTOCOL = {"stage_init": "sequential", "schedule": "constant", "optimizer_state": "fresh", "augment": "none",
                   "weight_decay": 0.0, "theta0": "epochs"}
# Θ0 within this much test accuracy of chance learned nothing there is to forget (left out of meta-training)
CHANCE_MARGIN = 0.05


def utc_now() -> str:
    """The one time format of ``finished_at`` (sweep records and catalog rows): ISO, UTC, whole seconds, so that
    string order is time order."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageRecord(_Record):
    stage: int = Field(ge=0)
    subset_size: int = Field(ge=1)
    steps: int = Field(ge=0)
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    wall_s: float


class TensorInfo(_Record):
    name: str
    shape: list[int]
    dtype: str
    kind: str  # conv / linear / bias / norm / buffer


class SweepRecord(_Record):
    format: int
    sweep_id: str
    spec: dict
    n_stages: int = Field(ge=1)
    n_params: int = Field(ge=0)
    stages: list[StageRecord]
    wall_s: float
    path: str = "reference"  # collectors.sweep.PATHS: the training loop that made it (absent before it existed)
    finished_at: str | None = None  # when its training ended (ISO, UTC); absent before it existed
    tensors: list[TensorInfo]
    versions: dict[str, str]

    @property
    def kinds(self) -> dict[str, str]:
        return {t.name: t.kind for t in self.tensors}

    @property
    def family(self) -> str:
        return self.spec["family"]

    @property
    def dataset(self) -> str:
        return self.spec["dataset"]

    @property
    def protocol(self) -> dict[str, str | float]:
        return {k: self.spec.get(k, v) for k, v in LEGACY_PROTOCOL.items()}

    def learned(self, num_classes: int = 10, margin: float = CHANCE_MARGIN) -> bool:
        """Did Θ0 learn its task (test accuracy more than ``margin`` above chance)? All three datasets have 10 classes."""
        return learned(self.stages[0].test_acc, num_classes, margin)


def learned(theta0_test_acc: float, num_classes: int = 10, margin: float = CHANCE_MARGIN) -> bool:
    return theta0_test_acc > 1 / num_classes + margin
