"""The pre-trained models an experiment fine-tunes from. Per pre-training seed: Θ0 on D0 and its forgetting
sweep Θ1…Θ4 (the config's protocol, which should be the one the KNOWN under test was meta-trained on:
``protocol_check``), the oracles (Θ0's recipe on supersets of D0 ×2, ×4) and Θ0 trained to convergence — all as
parallel Ray tasks, kept as artifacts of the parent run so a killed experiment does not train them again; or
Θ0…Θ4 of a collected sweep (``from_catalog``). ``source_accuracy`` scores any of them on the source task."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from collectors import data, zoo
from collectors.config import ConfigError
from collectors.sweep import Protocol, StagePlan, evaluate, nested_subsets, stage_plans, train_stages
from evaluation.config import Source, Task, TransferConfig, protocol_diff
from evaluation.finetune import task_split
from known.model import S
from known.predict import reestimate_bn

log = logging.getLogger(__name__)


@dataclass
class Trajectory:
    """Θ0…Θ4 of one pre-trained model, its oracles (×m data -> Θ0's recipe on it), and what is needed to
    rebuild and evaluate them."""

    stages: list[dict[str, torch.Tensor]]
    kinds: dict[str, str]
    family: str
    arch: dict
    task: Task  # the source task (for source-task accuracy)
    r: float
    bn_images: int
    wall: dict[str, float] = field(default_factory=dict)
    oracles: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    source_data: tuple | None = None  # (BN images, test split) of the source task, loaded on first use
    converged: dict[str, torch.Tensor] | None = None  # Θ0's recipe on D0 for ``converged_epochs``


def pretrain(src: Source, pseed: int, settings: data.DataSettings, multiplier: int,
             path: str = "reference", epochs: int | None = None) -> tuple[list[dict], list[float]]:
    """Θ0 on D0 (× ``multiplier``: an oracle) with the config's recipe; for D0 itself also the S−1 sweep
    stages on nested subsets shrinking by r, unless ``epochs`` asks for Θ0 alone trained that long (the
    "converged" control). The same seed gives D0, its oracles and its longer training the same initial
    weights and a superset of the same images. Returns the snapshots and the seconds per stage."""
    train = task_split(src, settings, True, pseed, multiplier)
    test = task_split(src, settings, False, 0)
    torch.manual_seed(pseed)
    info = data.DATASETS[src.dataset]
    model = zoo.build(src.family, src.arch, info.channels, len(src.classes))
    n_stages = S if multiplier == 1 and epochs is None else 1
    subsets = nested_subsets(len(train), None, src.r, n_stages, pseed)
    plans = stage_plans(src.theta0 if epochs is None else "epochs",  # the "converged" control: plain epochs
                        StagePlan(epochs or src.pretrain_epochs, src.pretrain_lr, src.pretrain_cosine),
                        StagePlan(src.stage_epochs, src.stage_lr, src.stage_cosine), n_stages)
    protocol = Protocol.of(src, pseed)
    walls: list[float] = []
    _, snaps = train_stages(model, train, test, subsets, plans, dataset=src.dataset, optimizer=src.optimizer,
                            batch_size=src.batch_size, gen=torch.Generator().manual_seed(pseed + 1),
                            on_stage=lambda m: walls.append(m.wall_s), protocol=protocol, path=path)
    return snaps, walls


def _pretrain_job(src_json: str, pseed: int, settings: data.DataSettings, multiplier: int, path: str,
                  epochs: int | None = None):
    torch.set_num_threads(1)
    return pretrain(Source.model_validate_json(src_json), pseed, settings, multiplier, path, epochs)


def _trajectory(cfg: TransferConfig, snaps: list[dict], walls: list[float], oracles: dict, oracle_s: float,
                converged: dict | None = None) -> Trajectory:
    src = cfg.source
    info = data.DATASETS[src.dataset]
    kinds = zoo.tensor_kinds(zoo.build(src.family, src.arch, info.channels, len(src.classes)))
    return Trajectory(snaps, kinds, src.family, src.arch, src, src.r, src.bn_images,
                      {"pretrain_s": walls[0], "sweep_s": sum(walls[1:]), "oracle_pretrain_s": oracle_s}, oracles,
                      converged=converged)


def prepare_trajectories(cfg: TransferConfig, settings: data.DataSettings, run_id: str,
                         donors: Sequence[str] = ()) -> dict[int, Trajectory]:
    """Every pre-training seed's trajectory and oracles: from the parent run's artifacts where an earlier,
    killed run of this config left them, else copied from a ``donors`` run (another experiment with the same
    source config and path), else trained now (one Ray task per model); stored in the parent run."""
    import ray
    from tqdm import tqdm

    cached = {p: t for p in cfg.pretrain_seeds if (t := load_trajectory(cfg, run_id, p)) is not None}
    for p in cfg.pretrain_seeds:
        if p not in cached and (t := _borrow(cfg, donors, p)) is not None:
            save_trajectory(t, run_id, p)
            cached[p] = t
    remote = ray.remote(num_cpus=1, max_retries=1)(_pretrain_job)
    extra = ["converged"] if "converged" in cfg.controls else []
    todo = {(p, m): remote.remote(cfg.source.model_dump_json(), p, settings, 1 if m == "converged" else m, cfg.path,
                                  cfg.source.converged_epochs if m == "converged" else None)
            for p in cfg.pretrain_seeds if p not in cached for m in [1, *cfg.source.oracles, *extra]}
    got = {}
    with tqdm(total=len(todo), desc="pre-training (Θ0 + sweep, oracles)", unit="model") as bar:
        pending = dict(zip(todo.values(), todo.keys()))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            got[pending.pop(done[0])] = ray.get(done[0])
            bar.update(1)
    for p in cfg.pretrain_seeds:
        if p in cached:
            continue
        snaps, walls = got[(p, 1)]
        oracles = {m: got[(p, m)][0][0] for m in cfg.source.oracles}
        cached[p] = _trajectory(cfg, snaps, walls, oracles, sum(got[(p, m)][1][0] for m in cfg.source.oracles),
                                got[(p, "converged")][0][0] if extra else None)
        save_trajectory(cached[p], run_id, p)
    return cached


def _borrow(cfg: TransferConfig, donors: Sequence[str], pseed: int) -> Trajectory | None:
    """Seed ``pseed``'s trajectory from the newest donor run that holds all of it, or None."""
    for rid in donors:
        if (t := load_trajectory(cfg, rid, pseed)) is not None:
            log.info("pre-training seed %d: reused from run %s (same source config and sweep path)", pseed, rid)
            return t
    return None


def save_trajectory(traj: Trajectory, run_id: str, pseed: int) -> None:
    """Θ0…Θ4 and the oracles as safetensors artifacts of the parent run; ``wall.json`` is written last and
    marks the set complete."""
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        for k, st in enumerate(traj.stages):
            safetensors.torch.save_file({n: t.contiguous() for n, t in st.items()}, f"{d}/stage{k}.safetensors")
        for m, st in traj.oracles.items():
            safetensors.torch.save_file({n: t.contiguous() for n, t in st.items()}, f"{d}/oracle_x{m}.safetensors")
        if traj.converged is not None:
            safetensors.torch.save_file({n: t.contiguous() for n, t in traj.converged.items()}, f"{d}/converged.safetensors")
        mlflow.log_artifacts(d, artifact_path=f"trajectories/p{pseed}")
        Path(d, "wall.json").write_text(json.dumps(traj.wall))
        mlflow.log_artifact(f"{d}/wall.json", artifact_path=f"trajectories/p{pseed}")


def load_trajectory(cfg: TransferConfig, run_id: str, pseed: int) -> Trajectory | None:
    import mlflow

    path = f"trajectories/p{pseed}"
    names = {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run_id, path)}
    needed = {"wall.json", *(f"stage{k}.safetensors" for k in range(S)), *(f"oracle_x{m}.safetensors" for m in cfg.source.oracles),
              *(["converged.safetensors"] if "converged" in cfg.controls else [])}
    if needed - names:  # none yet, or a donor run without the control this config adds
        return None
    with tempfile.TemporaryDirectory() as d:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=d))
        snaps = [safetensors.torch.load_file(str(local / f"stage{k}.safetensors")) for k in range(S)]
        oracles = {m: safetensors.torch.load_file(str(local / f"oracle_x{m}.safetensors")) for m in cfg.source.oracles}
        converged = safetensors.torch.load_file(str(local / "converged.safetensors")) if "converged" in cfg.controls else None
        wall = json.loads((local / "wall.json").read_text())
    log.info("pre-training seed %d: trajectory and oracles from the parent run's artifacts", pseed)
    return _trajectory(cfg, snaps, [wall["pretrain_s"], wall["sweep_s"]], oracles, wall.get("oracle_pretrain_s", 0.0),
                       converged)


def protocol_check(cfg: TransferConfig) -> tuple[dict | None, str | None]:
    """The evaluation sweep's protocol and, where the config tests a KNOWN whose meta-training protocol is
    recorded (the shipped one's ``PROVENANCE.json``, or a folder's), a line naming every field that differs."""
    if cfg.source is None:
        return None, None
    ours = cfg.source.protocol()
    if "known" not in cfg.methods:
        return ours, None
    from known import registry

    prov = (Path(cfg.known) if cfg.known and not cfg.known.startswith("models:/") else registry.SHIPPED) / "PROVENANCE.json"
    theirs = json.loads(prov.read_text()).get("protocol") if prov.is_file() else None
    if theirs is None:
        return ours, f"protocol: the KNOWN under test records no meta-training protocol; this evaluation sweeps with {ours}."
    diff, unknown = protocol_diff(ours, theirs)
    tail = f" The KNOWN's provenance does not record {', '.join(unknown)}." if unknown else ""
    if not diff:
        return ours, ("protocol: the evaluation sweep follows the KNOWN's meta-training protocol ("
                      + ", ".join(f"{k} {v}" for k, v in ours.items()) + ")." + tail)
    return ours, ("protocol MISMATCH: the KNOWN was meta-trained on other sweeps than it is tested on here — "
                  + "; ".join(f"{k}: here {a}, meta-training {b}" for k, (a, b) in diff.items()) + "." + tail)


def from_catalog(cfg: TransferConfig) -> Trajectory:
    """Θ0…Θ4 of a collected sweep."""
    from meta import readers

    ref = cfg.from_catalog
    found = list(readers.iter_sweeps(ref.root, where=lambda r: r["sweep_id"] == ref.sweep_id))
    if not found:
        raise ConfigError(f"sweep {ref.sweep_id!r} is not a done sweep of {ref.root}")
    sample = found[0]
    spec = sample.record.spec
    down = cfg.downstream
    if spec["dataset"] == down.dataset:
        raise ConfigError(f"sweep {ref.sweep_id} was trained on every class of {down.dataset}: a downstream task on the "
                          f"same dataset would not be new to it; choose another downstream dataset")
    a, b = data.DATASETS[spec["dataset"]], data.DATASETS[down.dataset]
    if (a.channels, a.size) != (b.channels, b.size):
        raise ConfigError(f"sweep {ref.sweep_id} ({spec['dataset']}) and downstream {down.dataset} images differ in shape")
    if sample.record.n_stages < S:
        raise ConfigError(f"sweep {ref.sweep_id} recorded {sample.record.n_stages} stages; KNOW needs {S}")
    kinds = sample.record.kinds
    stages = [{n: torch.from_numpy(sample.tensors[n][k].copy()) for n in kinds} for k in range(S)]
    walls = [s.wall_s for s in sample.record.stages]
    task = Task(dataset=spec["dataset"], test_size=spec["test_size"])
    return Trajectory(stages, kinds, spec["family"], spec["arch"], task, spec["r"], 2000,
                      {"pretrain_s": walls[0], "sweep_s": sum(walls[1:S])})


def source_accuracy(traj: Trajectory, state: dict, settings: data.DataSettings, bn: bool) -> float:
    """Source-task test accuracy of ``state``; with ``bn`` its BatchNorm statistics are re-estimated first on
    ``bn_images`` source training images (statistics copied from Θ0 no longer match moved weights)."""
    info = data.DATASETS[traj.task.dataset]
    model = zoo.build(traj.family, traj.arch, info.channels, len(traj.task.classes))
    model.load_state_dict(state)
    if traj.source_data is None:  # the PCA plane evaluates ~80 states: select the images once
        traj.source_data = (task_split(traj.task, settings, True, 0).x[: traj.bn_images], task_split(traj.task, settings, False, 0))
    bn_x, test = traj.source_data
    if bn:
        reestimate_bn(model, traj.task.dataset, bn_x)
    return evaluate(model, traj.task.dataset, test)[1]
