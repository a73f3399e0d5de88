"""Typed collection configs, validated at the edge, and deterministic sweep-spec sampling.

A ``SweepSpec`` fully determines one forgetting sweep (with the data); its id is a hash of its content, so
the same spec gets the same id on every machine and a re-run recognises finished work.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from collectors import zoo
from collectors.data import DATASETS
from meta.errors import OblivionError
from meta.record import LEGACY_PROTOCOL

M = TypeVar("M", bound=BaseModel)


class ConfigError(OblivionError, ValueError):
    """A config that cannot run; raised before any Ray work starts."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_family(v: str) -> str:
    if v not in zoo.FAMILIES:
        raise ValueError(f"unknown family {v!r}; known: {sorted(zoo.FAMILIES)}")
    return v


def _check_restart(m: M) -> M:
    """A restarted stage starts from the initial weights: there is no optimiser state to carry into it."""
    if m.stage_init == "restart" and m.optimizer_state == "carry":
        raise ValueError("stage_init='restart' trains every stage from the initial weights: "
                         "optimizer_state must be 'fresh', got 'carry'")
    return m


def _check_dataset(v: str) -> str:
    if v not in DATASETS:
        raise ValueError(f"unknown dataset {v!r}; known: {sorted(DATASETS)}")
    return v


StageInit = Literal["sequential", "restart"]
Schedule = Literal["constant", "cosine"]
OptimizerState = Literal["fresh", "carry"]
Augment = Literal["none", "crop_flip"]
# Θ0 trains pretrain_epochs; or until its training loss plateaus at a constant rate; or that, then annealed
Theta0 = Literal["epochs", "plateau", "plateau-anneal"]
SweepPath = Literal["reference", "fast"]  # the training loop (collectors.sweep.PATHS); not part of the spec
DEFAULT_SWEEP_PATH: SweepPath = "fast"


class ProtocolFields(_Strict):
    """The forgetting protocol: how a sweep's stages relate (one definition for the spec and the search space;
    ``meta.record.LEGACY_PROTOCOL`` holds the values every sweep had before a field existed)."""

    stage_init: StageInit = "sequential"
    schedule: Schedule = "constant"
    optimizer_state: OptimizerState = "fresh"
    augment: Augment = "none"
    weight_decay: float = Field(default=0.0, ge=0)
    theta0: Theta0 = "epochs"


class SweepSpec(ProtocolFields):
    """One forgetting sweep: Θ0 trained on D0, then L-1 stages on nested subsets shrinking by r.

    Protocol: ``stage_init`` sequential (stage k fine-tunes Θk−1, the paper) or restart (every stage trains
    from the same initial weights on its subset, the authors' released collector); ``schedule`` of every
    stage, pre-training included (constant, or cosine to zero over the stage); ``optimizer_state`` fresh per
    stage or carried over; ``augment`` (random crop with padding + horizontal flip, seeded); ``weight_decay``
    decoupled from the gradient (Adam becomes AdamW): without it Adam behind BatchNorm grows the norms at
    every step, so stepping "back" along a sweep shrinks by construction. ``theta0`` plateau trains Θ0 at a
    constant rate until its training loss plateaus (``collectors.sweep.plateaued``; ``pretrain_epochs`` is
    then the cap, and stages as long as ``pretrain_epochs`` last as long as Θ0 took); plateau-anneal then
    cosine-decays Θ0's rate to zero over as many epochs again, so Θ0 ends annealed as every stage does (plain
    plateau leaves it at the constant rate's noise: its first stage, on half the data, tested better)."""

    family: str
    arch: dict
    dataset: str
    r: float = Field(gt=0, lt=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    optimizer: Literal["adam", "sgd"]
    pretrain_epochs: int = Field(ge=1)
    n_stages: int = Field(ge=3)
    stage_epochs: int = Field(ge=1)
    train_size: int | None = Field(default=None, ge=1)  # |D0|; None = the full training set
    test_size: int | None = Field(default=None, ge=1)  # test images per evaluation; None = all
    seed: int

    _family = field_validator("family")(_check_family)
    _dataset = field_validator("dataset")(_check_dataset)

    @model_validator(mode="after")
    def _subsets_nonempty(self) -> SweepSpec:
        if self.train_size is not None and stage_sizes(self.train_size, self.r, self.n_stages)[-1] < 1:
            raise ValueError(
                f"train_size={self.train_size} with r={self.r} leaves an empty last subset after "
                f"{self.n_stages - 1} stages; raise train_size or r, or lower n_stages"
            )
        return self

    _restart_is_fresh = model_validator(mode="after")(lambda self: _check_restart(self))

    @property
    def sweep_id(self) -> str:
        """A hash of the spec; a protocol field at its LEGACY_PROTOCOL value (what every sweep collected before
        the field existed used) is left out, so those sweeps keep their ids."""
        content = {k: v for k, v in self.model_dump(mode="json").items() if LEGACY_PROTOCOL.get(k, ...) != v}
        canon = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]


def stage_sizes(n0: int, r: float, n_stages: int) -> list[int]:
    """|D0|, |D1| = round(r·|D0|), …: the nested subset sizes of a sweep."""
    sizes = [n0]
    for _ in range(n_stages - 1):
        sizes.append(round(r * sizes[-1]))
    return sizes


class SearchSpace(ProtocolFields):
    """Where specs are drawn from: families and datasets uniformly, r uniformly, lr and batch log-uniformly."""

    families: list[str] = Field(default_factory=lambda: sorted(zoo.FAMILIES), min_length=1)
    datasets: list[str] = Field(default_factory=lambda: sorted(DATASETS), min_length=1)
    r: tuple[float, float] = (0.3, 0.9)
    lr: tuple[float, float] = (1e-5, 4e-3)
    batch_size: tuple[int, int] = (32, 256)
    optimizers: list[Literal["adam", "sgd"]] = Field(default_factory=lambda: ["adam"], min_length=1)
    pretrain_epochs: int = Field(default=5, ge=1)
    n_stages: int = Field(default=7, ge=3)
    stage_epochs: Annotated[int, Field(ge=1)] | Literal["pretrain"] = 1  # "pretrain": as many epochs as Θ0 had
    train_size: int | None = Field(default=None, ge=1)
    test_size: int | None = Field(default=None, ge=1)

    _families = field_validator("families")(lambda vs: [_check_family(v) for v in vs])
    _datasets = field_validator("datasets")(lambda vs: [_check_dataset(v) for v in vs])

    _restart_is_fresh = model_validator(mode="after")(lambda self: _check_restart(self))

    @field_validator("r")
    @classmethod
    def _r_in_unit(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0 < lo <= hi < 1):
            raise ValueError(f"r range {list(v)} must satisfy 0 < low <= high < 1")
        return v

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError(f"lr range {list(v)} must satisfy 0 < low <= high")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not (1 <= v[0] <= v[1]):
            raise ValueError(f"batch_size range {list(v)} must satisfy 1 <= low <= high")
        return v


class WorkerSettings(_Strict):
    num_workers: int | None = Field(default=None, ge=1)  # workers to request (None: what the cluster's CPUs hold now)
    cpus_per_worker: float = Field(default=1, gt=0)  # Ray CPUs reserved by each worker actor
    threads_per_worker: int = Field(default=1, ge=1)  # torch threads inside it (1 worker per core on a laptop)
    max_retries: int = Field(default=2, ge=0)  # extra attempts when a worker dies mid-sweep
    shard_max_bytes: int = Field(default=256 * 2**20, ge=1)  # a shard is published once it is this big…
    # …or this old: bounds what a dead worker's re-runs cost. 30 min at the sizing table's median (a 2.5 MB sweep
    # every ~72 s a worker) makes ~60 MB shards, MosaicML's recommended 50-100 MB (docs/scale.md, "Shard sizes")
    shard_max_seconds: float = Field(default=1800, ge=0)
    sweep_path: SweepPath = DEFAULT_SWEEP_PATH  # "reference": the plain loop every sweep before "fast" ran


class DataConfig(_Strict):
    download: bool = False
    unverified_cifar10: bool = False


class CollectConfig(_Strict):
    seed: int = 0
    num_sweeps: int = Field(ge=1)
    space: SearchSpace = Field(default_factory=SearchSpace)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    data: DataConfig = Field(default_factory=DataConfig)

    @model_validator(mode="after")
    def _smallest_subset(self) -> CollectConfig:
        s = self.space
        if s.train_size is not None and stage_sizes(s.train_size, s.r[0], s.n_stages)[-1] < 1:
            raise ValueError(
                f"space.train_size={s.train_size} with r={s.r[0]} leaves an empty last subset after "
                f"{s.n_stages - 1} stages; raise train_size or r, or lower n_stages"
            )
        return self



def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = "" if e["type"] == "missing" or not e["loc"] else f" (got {_short(e['input'])})"
        lines.append(f"  {where}: {e['msg']}{got}")
    return "\n".join(lines)


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_yaml_model(model: type[M], path: str | Path) -> M:
    """Read a YAML file and validate it as ``model``; ConfigError names every bad field and value."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    return parse_model(model, raw, str(path))


def parse_model(model: type[M], raw: object, source: str = "<dict>") -> M:
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source} must be a mapping, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def load_config(path: str | Path) -> CollectConfig:
    return load_yaml_model(CollectConfig, path)


def parse_config(raw: object, source: str = "<dict>") -> CollectConfig:
    return parse_model(CollectConfig, raw, source)


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def sample_spec(config: CollectConfig, index: int) -> SweepSpec:
    """Spec number ``index``: drawn from its own RNG, so raising num_sweeps keeps earlier specs unchanged."""
    s = config.space
    rng = random.Random(f"oblivion:{config.seed}:{index}")
    family = s.families[rng.randrange(len(s.families))]
    return SweepSpec(
        family=family,
        arch=zoo.sample_arch(family, rng),
        dataset=s.datasets[rng.randrange(len(s.datasets))],
        r=round(rng.uniform(*s.r), 4),
        lr=float(f"{_log_uniform(rng, *s.lr):.3g}"),
        batch_size=int(round(_log_uniform(rng, *s.batch_size))),
        optimizer=s.optimizers[rng.randrange(len(s.optimizers))],
        pretrain_epochs=s.pretrain_epochs,
        n_stages=s.n_stages,
        stage_epochs=s.pretrain_epochs if s.stage_epochs == "pretrain" else s.stage_epochs,
        train_size=s.train_size,
        test_size=s.test_size,
        seed=rng.randrange(2**31),
        **{k: getattr(s, k) for k in ProtocolFields.model_fields},
    )


def sample_specs(config: CollectConfig) -> list[SweepSpec]:
    return [sample_spec(config, i) for i in range(config.num_sweeps)]
