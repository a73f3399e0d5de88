"""The transfer experiment's config: one YAML file, validated here before any training starts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collectors import zoo
from collectors.config import load_yaml_model, parse_model
from collectors.data import DATASETS
from known.predict import METHODS

CONTROLS = ("average", "shrink-perturb", "shrink", "shrink-fixed", "bn-reset", "lr")
# the protocol fields a meta-dataset records (meta.record.LEGACY_PROTOCOL): the KNOWN under test was
# meta-trained on one of them, and an evaluation that sweeps differently tests it out of distribution
PROTOCOL_FIELDS = ("stage_init", "stage_epochs", "schedule", "optimizer_state", "augment")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Task(_Strict):
    """A classification task: some classes of a dataset, optionally subsampled."""

    dataset: str
    classes: list[int] = Field(default_factory=lambda: list(range(10)), min_length=2)
    train_size: int | None = Field(default=None, ge=1)  # images drawn from those classes; None = all of them
    test_size: int | None = Field(default=None, ge=1)  # None = every test image of those classes

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; known: {sorted(DATASETS)}")
        return v

    @model_validator(mode="after")
    def _classes(self) -> Task:
        n = DATASETS[self.dataset].num_classes
        bad = [c for c in self.classes if not 0 <= c < n]
        if bad or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes {self.classes} must be distinct labels in 0..{n - 1} of {self.dataset}")
        return self


class Source(Task):
    """Pre-training: Θ0 on the source task, then the forgetting sweep (S stages on nested subsets)."""

    family: str = "cnn"
    arch: dict = Field(default_factory=lambda: {"depth": 3, "width": 16, "hidden": 64})
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = Field(default=64, ge=1)
    pretrain_epochs: int = Field(default=10, ge=1)
    pretrain_lr: float = Field(default=1e-3, gt=0)
    pretrain_cosine: bool = True  # the paper's text: trained to convergence with a decayed lr
    r: float = Field(default=0.5, gt=0, lt=1)
    stage_epochs: int = Field(default=2, ge=1)
    stage_lr: float = Field(default=1e-3, gt=0)
    bn_images: int = Field(default=2000, ge=1)  # source images to re-estimate BN statistics on
    stage_cosine: bool = False  # each stage cosine-decayed too (the meta-v2 protocol), not a constant lr
    stage_init: Literal["sequential", "restart"] = "sequential"
    optimizer_state: Literal["fresh", "carry"] = "fresh"
    augment: Literal["none", "crop_flip"] = "none"
    # the ceiling: Θ0's recipe on supersets of D0 m times its size (m = 1/r^k, the ×data a KNOW step claims)
    oracles: list[int] = Field(default_factory=list)

    @field_validator("oracles")
    @classmethod
    def _oracles(cls, v: list[int]) -> list[int]:
        if any(m < 2 for m in v) or len(set(v)) != len(v):
            raise ValueError(f"oracles {v} must be distinct data multipliers >= 2")
        return sorted(v)

    @model_validator(mode="after")
    def _room_for_oracles(self) -> Source:
        if self.oracles and self.train_size is None:
            raise ValueError(f"oracles {self.oracles} need a source train_size: D0 must leave room for ×{max(self.oracles)}")
        return self

    def protocol(self) -> dict:
        """This sweep in the meta-dataset's protocol terms (``configs/meta-v2.yaml``)."""
        name = {True: "cosine", False: "constant"}
        schedule = (name[self.pretrain_cosine] if self.pretrain_cosine == self.stage_cosine
                    else f"{name[self.pretrain_cosine]} Θ0, {name[self.stage_cosine]} stages")
        return {"stage_init": self.stage_init, "schedule": schedule, "optimizer_state": self.optimizer_state,
                "augment": self.augment, "stage_epochs": "pretrain" if self.stage_epochs == self.pretrain_epochs else self.stage_epochs}

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        if v not in zoo.FAMILIES:
            raise ValueError(f"unknown family {v!r}; known: {sorted(zoo.FAMILIES)}")
        return v


class FromCatalog(_Strict):
    """Take Θ0…Θ4 from an existing sweep of a collected meta-dataset instead of training them."""

    root: str
    sweep_id: str


class Downstream(Task):
    head_epochs: int = Field(default=5, ge=0)  # head-only phase: how good are the features
    head_lr: float = Field(default=1e-2, gt=0)
    full_epochs: int = Field(default=10, ge=0)  # then full fine-tuning with cosine decay
    full_lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=32, ge=1)
    seeds: int = Field(default=10, ge=2)  # paired seeds: the same seed gives every method the same subset, head and order
    # BN statistics before fine-tuning: re-estimated on the downstream images, kept from the source, or reset
    # to (0, 1) as the authors' pipeline does for KNOW initialisations (the "bn-reset" control)
    bn: Literal["reestimate", "keep", "reset"] = "reestimate"


class TransferConfig(_Strict):
    name: str = Field(min_length=1)
    seed: int = 0
    pretrain_seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    source: Source | None = None
    from_catalog: FromCatalog | None = None
    downstream: Downstream
    methods: list[str] = Field(default_factory=lambda: ["known", "taskvector", "linearfit"])
    steps: int = Field(default=3, ge=1, le=6)  # ×1/r, ×1/r², ×1/r³
    controls: list[str] = Field(default_factory=lambda: list(CONTROLS))
    shrink_perturb_for: list[str] = Field(default_factory=lambda: ["known"])  # predictors whose update the controls match
    shrink_fixed: float = Field(default=0.8, gt=0, lt=1)  # "shrink-fixed": every predicted tensor × shrink_fixed^k
    lr_factors: list[float] = Field(default_factory=lambda: [1.5, 2.0])  # "lr": naive fine-tuned at full_lr × these
    scratch: bool = True
    known: str | None = None  # KNOWN: models:/KNOWN@champion, a folder, or None for the shipped one
    known_official: str | None = None  # folder with the authors' KNOWN_{Conv,FC,Bias}.h5
    workers: int | None = Field(default=None, ge=1)  # parallel fine-tunes (default: the machine's CPUs)
    unverified_cifar10: bool = False

    @field_validator("methods", "controls")
    @classmethod
    def _known_names(cls, v: list[str], info) -> list[str]:
        allowed = METHODS if info.field_name == "methods" else CONTROLS
        bad = [m for m in v if m not in allowed]
        if bad:
            raise ValueError(f"unknown {info.field_name} {bad}; known: {list(allowed)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TransferConfig:
        if (self.source is None) == (self.from_catalog is None):
            raise ValueError("give exactly one of `source` (train Θ0 and its sweep) or `from_catalog` (reuse a sweep)")
        if "known-official" in self.methods and not self.known_official:
            raise ValueError("method 'known-official' needs `known_official: <folder with KNOWN_*.h5>`")
        if {"shrink-perturb", "shrink"} & set(self.controls):
            bad = [m for m in self.shrink_perturb_for if m not in self.methods]
            if bad:
                raise ValueError(f"shrink_perturb_for {bad} must be among methods {self.methods}")
        src, down = self.source, self.downstream
        if src is not None:
            a, b = DATASETS[src.dataset], DATASETS[down.dataset]
            if (a.channels, a.size) != (b.channels, b.size):
                raise ValueError(f"source {src.dataset} ({a.channels}×{a.size}²) and downstream {down.dataset} "
                                 f"({b.channels}×{b.size}²) images differ in shape: the backbone cannot transfer")
        if src is not None and src.dataset == down.dataset and set(src.classes) & set(down.classes):
            raise ValueError(f"source classes {src.classes} and downstream classes {down.classes} of {down.dataset} "
                             f"overlap: the downstream task must be new to the pre-trained model")
        if any(f <= 0 for f in self.lr_factors):
            raise ValueError(f"lr_factors {self.lr_factors} must be positive")
        if down.train_size is not None and down.train_size < len(down.classes):
            raise ValueError(f"downstream train_size={down.train_size} is fewer than its {len(down.classes)} classes")
        if src is not None:
            try:
                zoo.build(src.family, src.arch, DATASETS[src.dataset].channels, len(src.classes))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"source arch {src.arch} does not build a {src.family}: {e}") from e
        return self


def load_config(path: str | Path) -> TransferConfig:
    return load_yaml_model(TransferConfig, path)


def parse_config(raw: object, source: str = "<dict>") -> TransferConfig:
    return parse_model(TransferConfig, raw, source)
