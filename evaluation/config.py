"""The transfer experiment's config: one YAML file, validated here before any training starts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collectors import zoo
from collectors.config import Augment, OptimizerState, StageInit, SweepPath, Theta0, load_yaml_model, parse_model
from collectors.data import DATASETS
from known.predict import METHODS

DEFAULT_CONTROLS = ("average", "shrink-perturb", "shrink", "shrink-fixed", "bn-reset", "lr")
# and those of the released scripts' recipe: naive with BN at init, the last stage, Θ0 trained to convergence
CONTROLS = (*DEFAULT_CONTROLS, "bn-init", "last", "converged")
# the protocol fields a meta-dataset records (meta.record.LEGACY_PROTOCOL): the KNOWN under test was
# meta-trained on one of them, and an evaluation that sweeps differently tests it out of distribution
PROTOCOL_FIELDS = ("stage_init", "stage_epochs", "schedule", "optimizer_state", "augment", "weight_decay", "theta0")
# and the scale of a sweep, which a meta-dataset records as the range it sampled: an evaluation outside it tests
# the KNOWN out of distribution as much as another protocol does (|D0|, Θ0's epochs, r, the learning rate)
SCALE_FIELDS = ("train_size", "pretrain_epochs", "r", "lr")


def protocol_diff(ours: dict, theirs: dict) -> tuple[dict, list[str]]:
    """Fields where an evaluation sweep (``ours``) leaves a KNOWN's meta-training protocol (``theirs``, as
    ``known.registry.protocol_of`` records it: a value, or [low, high] for a scale field that varied), and the
    scale fields ``theirs`` does not record. A protocol field it predates reads as its value before it existed."""
    from meta.record import LEGACY_PROTOCOL

    diff, unknown = {}, []
    for k in (*PROTOCOL_FIELDS, *SCALE_FIELDS):
        if k in SCALE_FIELDS and k not in theirs:
            unknown.append(k)
            continue
        t = theirs.get(k, LEGACY_PROTOCOL.get(k))
        inside = t[0] <= ours[k] <= t[1] if k in SCALE_FIELDS and isinstance(t, list) else ours[k] == t
        if not inside:
            diff[k] = (ours[k], t)
    return diff, unknown


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
    stage_init: StageInit = "sequential"
    optimizer_state: OptimizerState = "fresh"
    augment: Augment = "none"
    weight_decay: float = Field(default=0.0, ge=0)  # decoupled (AdamW) in pre-training and every stage
    # "plateau(-anneal)": Θ0 at a constant rate until its training loss plateaus (pretrain_epochs the cap; meta-v3's rule,
    # collectors.sweep.stage_plans), stages as long as pretrain_epochs then last as long as Θ0 took; oracles too
    theta0: Theta0 = "epochs"
    # the ceiling: Θ0's recipe on supersets of D0 m times its size (m = 1/r^k, the ×data a KNOW step claims)
    oracles: list[int] = Field(default_factory=list)
    # the "converged" control: Θ0's recipe on D0 for this many epochs (is a gain just more training?)
    converged_epochs: int | None = Field(default=None, ge=1)

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
                "augment": self.augment, "stage_epochs": "pretrain" if self.stage_epochs == self.pretrain_epochs else self.stage_epochs,
                "weight_decay": self.weight_decay, "theta0": self.theta0, "train_size": self.train_size,
                "pretrain_epochs": self.pretrain_epochs, "r": self.r, "lr": self.pretrain_lr}

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
    # the head phase also trains the BatchNorm parameters, in training mode (the released fine-tuning scripts)
    head_trains_bn: bool = False


class Tuning(_Strict):
    """Every initialisation fine-tuned at each full-phase learning rate ``full_lr × lr_factors``; each one's
    rate is selected on ``validation`` images held out of the downstream training images (never the test
    set) and its test accuracy reported at that rate. A method that only changes the effective learning
    rate loses its edge when every arm gets its best rate."""

    lr_factors: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0], min_length=2)
    validation: int = Field(default=100, ge=1)

    @field_validator("lr_factors")
    @classmethod
    def _factors(cls, v: list[float]) -> list[float]:
        if any(f <= 0 for f in v) or len(set(v)) != len(v) or 1.0 not in v:
            raise ValueError(f"lr_factors {v} must be distinct, positive and include 1 (the config's own rate)")
        return sorted(v)


class TransferConfig(_Strict):
    name: str = Field(min_length=1)
    seed: int = 0
    pretrain_seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    source: Source | None = None
    from_catalog: FromCatalog | None = None
    downstream: Downstream
    methods: list[str] = Field(default_factory=lambda: ["known", "taskvector", "linearfit"])
    steps: int = Field(default=3, ge=1, le=6)  # ×1/r, ×1/r², ×1/r³
    controls: list[str] = Field(default_factory=lambda: list(DEFAULT_CONTROLS))
    shrink_perturb_for: list[str] = Field(default_factory=lambda: ["known"])  # predictors whose update the controls match
    shrink_fixed: float = Field(default=0.8, gt=0, lt=1)  # "shrink-fixed": every predicted tensor × shrink_fixed^k
    lr_factors: list[float] = Field(default_factory=lambda: [1.5, 2.0])  # "lr": naive fine-tuned at full_lr × these
    scratch: bool = True
    known: str | None = None  # KNOWN: models:/KNOWN@champion, a folder, or None for the shipped one
    known_official: str | None = None  # folder with the authors' KNOWN_{Conv,FC,Bias}.h5
    workers: int | None = Field(default=None, ge=1)  # parallel fine-tunes (default: the machine's CPUs)
    unverified_cifar10: bool = False
    tuning: Tuning | None = None  # a learning-rate grid per initialisation, selected on held-out images
    path: SweepPath = "reference"  # the training loop of pre-training and fine-tunes (collectors.sweep.PATHS)
    # BatchNorm of every prediction (and of its controls): Θ0's, or at initialisation as in the released
    # scripts, which load only the layers holding exactly a kernel and a bias into a fresh model
    predicted_bn: Literal["theta0", "init"] = "theta0"

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
        if "converged" in self.controls and (src is None or src.converged_epochs is None):
            raise ValueError("control 'converged' needs `source.converged_epochs` (how long Θ0's recipe trains to converge)")
        if any(f <= 0 for f in self.lr_factors):
            raise ValueError(f"lr_factors {self.lr_factors} must be positive")
        if down.train_size is not None and down.train_size < len(down.classes):
            raise ValueError(f"downstream train_size={down.train_size} is fewer than its {len(down.classes)} classes")
        if self.tuning is not None:
            left = (down.train_size or 10**9) - self.tuning.validation
            if left < len(down.classes):
                raise ValueError(f"tuning.validation={self.tuning.validation} leaves {left} of downstream train_size="
                                 f"{down.train_size} images to train on, fewer than its {len(down.classes)} classes")
            if "lr" in self.controls:
                raise ValueError("control 'lr' (naive at larger rates) is subsumed by `tuning`: drop it from controls")
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
