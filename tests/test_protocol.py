"""Forgetting protocols as spec fields: restart, stage length, schedules, carried optimiser state, augmentation,
and the sweeps and catalogs collected before these fields existed."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from collectors import sweep
from collectors.augment import crop_flip
from collectors.config import ConfigError, SweepSpec, load_config, parse_config, sample_specs
from collectors.sweep import run_sweep
from conftest import REPO, tiny_config
from meta import catalog

LEGACY = dict(family="cnn", arch={"depth": 2, "width": 8, "hidden": 16}, dataset="mnist", r=0.5, lr=1e-3, batch_size=32,
              optimizer="adam", pretrain_epochs=2, n_stages=4, stage_epochs=1, train_size=200, test_size=64, seed=3)


def _spec(**over) -> SweepSpec:
    return SweepSpec(**{**LEGACY, **over})


def test_sweeps_collected_before_the_protocol_fields_keep_their_ids():
    # the id this spec had before the protocol fields existed (computed on the commit before them)
    assert _spec().sweep_id == "a3c51af98d0a5272"
    assert _spec(stage_init="sequential", schedule="constant", optimizer_state="fresh", augment="none",
                 weight_decay=0.0, theta0="epochs").sweep_id == "a3c51af98d0a5272"
    ids = {_spec(**f).sweep_id for f in ({}, {"stage_init": "restart"}, {"schedule": "cosine"},
                                          {"optimizer_state": "carry"}, {"augment": "crop_flip"}, {"weight_decay": 0.05},
                                          {"theta0": "plateau"}, {"theta0": "plateau-anneal"})}
    assert len(ids) == 8  # every protocol field is part of the content-addressed id


def _stage_starts(monkeypatch, spec, settings):
    """The weights each stage starts from (train_epochs is called once per stage)."""
    starts, original = [], sweep.train_epochs

    def spy(model, opt, *args, **kwargs):
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return original(model, opt, *args, **kwargs)

    monkeypatch.setattr(sweep, "train_epochs", spy)
    return run_sweep(spec, settings), starts


def test_restart_trains_every_stage_from_the_same_initial_weights(monkeypatch, settings):
    res, starts = _stage_starts(monkeypatch, _spec(stage_init="restart"), settings)
    assert len(starts) == 4
    for s in starts[1:]:
        assert all(torch.equal(s[k], starts[0][k]) for k in s)
    res_seq, starts_seq = _stage_starts(monkeypatch, _spec(), settings)
    assert torch.equal(starts_seq[2]["0.weight"], res_seq.tensors["0.weight"][1])  # sequential: from Θk−1
    assert not torch.equal(starts_seq[2]["0.weight"], starts_seq[0]["0.weight"])


def test_stage_sizes_and_epochs_follow_the_spec(settings):
    spec = _spec(stage_epochs=3, pretrain_epochs=2, schedule="cosine")
    res = run_sweep(spec, settings)
    sizes = [200, 100, 50, 25]
    assert [m.subset_size for m in res.stages] == sizes
    assert [m.steps for m in res.stages] == [e * math.ceil(n / 32) for e, n in zip([2, 3, 3, 3], sizes)]
    as_long = sample_specs(tiny_config(space__stage_epochs="pretrain", space__pretrain_epochs=4))[0]
    assert as_long.stage_epochs == as_long.pretrain_epochs == 4


def test_carried_optimizer_keeps_its_moments_and_restarts_its_learning_rate():
    model = torch.nn.Linear(3, 2)
    opt = sweep._stage_optimizer("adam", model, 1e-3, None, "reference")
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = sweep.cosine_schedule(opt, 1, 10, 10)
    opt.step()
    sched.step()  # decayed to zero
    again = sweep._stage_optimizer("adam", model, 1e-3, opt, "reference")
    assert again is opt and opt.param_groups[0]["lr"] == 1e-3 and opt.state  # Adam's moments survive
    assert sweep._stage_optimizer("adam", model, 1e-3, None, "reference") is not opt


def test_carry_and_cosine_protocols_train_and_differ_from_today(settings):
    base = run_sweep(_spec(), settings)
    for fields in ({"optimizer_state": "carry"}, {"schedule": "cosine"}):
        other = run_sweep(_spec(**fields), settings)
        assert torch.isfinite(other.tensors["0.weight"]).all()
        assert torch.equal(other.tensors["0.weight"][0], base.tensors["0.weight"][0]) == ("optimizer_state" in fields)


def test_crop_flip_is_deterministic_per_seed_and_keeps_the_images():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = crop_flip(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, crop_flip(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, crop_flip(x, torch.Generator().manual_seed(6)))
    assert a.shape == x.shape and a.dtype == x.dtype
    flips = crop_flip(x, torch.Generator().manual_seed(5), pad=0)  # no padding: each image itself or its mirror
    assert all(torch.equal(f, i) or torch.equal(f, i.flip(-1)) for f, i in zip(flips, x))
    assert any(torch.equal(f, i.flip(-1)) and not torch.equal(f, i) for f, i in zip(flips, x))
    shifted = crop_flip(torch.full((64, 1, 8, 8), 255, dtype=torch.uint8), torch.Generator().manual_seed(0), pad=1)
    assert (shifted == 0).any()  # a crop off the centre brings in zero padding


def test_augmented_sweeps_are_reproducible_and_differ_from_unaugmented(settings):
    a, b = run_sweep(_spec(augment="crop_flip"), settings), run_sweep(_spec(augment="crop_flip"), settings)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not torch.equal(a.tensors["0.weight"], run_sweep(_spec(), settings).tensors["0.weight"])


def test_restart_with_carried_state_is_refused_naming_both_fields():
    with pytest.raises(ValueError, match="optimizer_state"):
        _spec(stage_init="restart", optimizer_state="carry")
    with pytest.raises(ConfigError, match="optimizer_state must be 'fresh'"):
        parse_config({"num_sweeps": 1, "space": {"stage_init": "restart", "optimizer_state": "carry"}})
    with pytest.raises(ConfigError, match="stage_epochs"):
        parse_config({"num_sweeps": 1, "space": {"stage_epochs": "forever"}})


def test_shipped_protocol_configs_parse_and_share_their_draws():
    specs = {p.stem: sample_specs(load_config(p)) for p in sorted((REPO / "configs" / "protocols").glob("*.yaml"))}
    assert {"today", "restart", "long-cosine", "long-cosine-aug", "small-r"} <= set(specs)
    for name, ss in specs.items():  # the study is paired: same architectures, learning rates and seeds
        assert [(s.family, s.arch, s.lr, s.seed) for s in ss] == [(s.family, s.arch, s.lr, s.seed) for s in specs["today"]], name
    assert {s.stage_init for s in specs["restart"]} == {"restart"}
    assert all(s.stage_epochs == s.pretrain_epochs for s in specs["long-cosine"])
    assert load_config(REPO / "configs" / "released.yaml").space.stage_init == "restart"


def test_a_catalog_written_before_the_protocol_columns_still_reads(tmp_path):
    old_schema = pa.schema([f for f in catalog.SCHEMA if f.name not in ("stage_init", "schedule", "optimizer_state", "augment")])
    row = {"sweep_id": "a3c51af98d0a5272", "status": "failed", "error": "x", "attempts": 1, "family": "cnn",
           "spec": json.dumps(_spec().model_dump(mode="json"))}
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in old_schema.names}], schema=old_schema),
                   tmp_path / catalog.FILENAME)
    [got] = catalog.read(str(tmp_path))
    assert got["stage_init"] == "sequential" and got["schedule"] == "constant" and got["augment"] == "none"
    catalog.write(str(tmp_path), [got])  # and is rewritten with the new columns
    assert catalog.read(str(tmp_path))[0]["optimizer_state"] == "fresh"
    old_spec = {k: v for k, v in json.loads(row["spec"]).items() if k not in ("stage_init", "schedule", "optimizer_state", "augment")}
    assert SweepSpec.model_validate(old_spec).sweep_id == "a3c51af98d0a5272"


def test_weight_decay_is_decoupled_and_holds_the_norms_that_adam_grows(settings):
    """Adam behind BatchNorm grows the conv kernels' norm along a sweep; AdamW's decoupled decay is the protocol
    field that holds it (the norm-versus-direction question of docs/predictability.md)."""
    model = torch.nn.Linear(2, 2)
    assert type(sweep._optimizer("adam", model, 1e-3, weight_decay=0.1)) is torch.optim.AdamW
    assert type(sweep._optimizer("adam", model, 1e-3)) is torch.optim.Adam
    assert sweep._optimizer("sgd", model, 1e-3, weight_decay=0.1).defaults["weight_decay"] == 0.1

    def conv_norms(spec):
        res = run_sweep(spec, settings)
        conv = [n for n, k in res.kinds.items() if k == "conv"]
        return [math.sqrt(sum(float(res.tensors[n][s].double().pow(2).sum()) for n in conv)) for s in range(spec.n_stages)]

    plain, decayed = conv_norms(_spec(lr=3e-3)), conv_norms(_spec(lr=3e-3, weight_decay=0.5))
    assert decayed[-1] / decayed[0] < plain[-1] / plain[0]
    with pytest.raises(ValueError, match="weight_decay"):
        _spec(weight_decay=-1.0)


def test_the_plateau_rule():
    assert not sweep.plateaued([2.0, 1.5, 1.2])  # too short to tell
    assert not sweep.plateaued([2.0, 1.5, 1.2, 1.0, 0.9, 0.8])  # still falling by more than 2% of 1.0
    assert sweep.plateaued([2.0, 1.0, 0.99, 0.995, 0.985])  # best 0.985 vs 1.0 before: 1.5% < 2%
    assert sweep.plateaued([0.02, 0.01, 0.008, 0.007, 0.006])  # halving near zero, but by less than 0.005
    assert not sweep.plateaued([1.0, 0.9, 0.8, 0.7], patience=1)


def _train_epochs_calls(monkeypatch) -> list[tuple[int, int, bool]]:
    """Every ``sweep.train_epochs`` call from now on, as (images, epochs, with a schedule)."""
    calls, original = [], sweep.train_epochs

    def spy(model, opt, split, idx, dataset, batch_size, epochs, *a, **k):
        sched = a[1] if len(a) > 1 else k.get("sched")
        calls.append((len(idx), epochs, sched is not None))
        return original(model, opt, split, idx, dataset, batch_size, epochs, *a, **k)

    monkeypatch.setattr(sweep, "train_epochs", spy)
    return calls


@pytest.mark.parametrize("theta0", ["plateau", "plateau-anneal"])
def test_theta0_trains_until_its_loss_plateaus_and_the_stages_as_long_as_it_took(settings, monkeypatch, theta0):
    epochs_of_stage = _train_epochs_calls(monkeypatch)
    spec = _spec(theta0=theta0, pretrain_epochs=40, stage_epochs=40, schedule="cosine", lr=3e-3)
    res = run_sweep(spec, settings)
    theta0_calls = [(e, cos) for n, e, cos in epochs_of_stage if n == 200]
    plateau = [c for c in theta0_calls if c == (1, False)]  # epoch by epoch at a constant rate until the plateau
    assert 3 < len(plateau) <= 40
    anneal = [(len(plateau), True)] if theta0 == "plateau-anneal" else []  # then decayed over as many epochs again
    assert theta0_calls == plateau + anneal
    assert [(e, cos) for n, e, cos in epochs_of_stage if n < 200] == [(len(plateau), True)] * 3  # as long as the plateau
    per_epoch = math.ceil(200 / spec.batch_size)
    assert res.stages[0].steps == len(plateau) * per_epoch * (1 + bool(anneal))
    again = run_sweep(spec, settings)  # deterministic: the same plateau, the same weights
    assert all(torch.equal(res.tensors[k], again.tensors[k]) for k in res.tensors)


def test_the_evaluation_pre_trains_a_plateau_theta0_by_the_collections_rule(settings, monkeypatch):
    """An evaluation source with ``theta0: plateau-anneal`` is pre-trained as meta-v3's sweeps are (one rule,
    ``sweep.stage_plans``) and says so in its protocol; the "converged" control keeps its plain epochs."""
    from evaluation import trajectories
    from evaluation.config import Source

    epochs_of_stage = _train_epochs_calls(monkeypatch)
    src = Source(dataset="mnist", train_size=200, arch=LEGACY["arch"], batch_size=32, theta0="plateau-anneal",
                 pretrain_epochs=40, stage_epochs=40, pretrain_lr=3e-3, stage_lr=3e-3, stage_cosine=True)
    trajectories.pretrain(src, 0, settings, 1)
    theta0 = [e for n, e, _ in epochs_of_stage if n == 200]
    plateau = len(theta0) - 1
    assert theta0 == [1] * plateau + [plateau] and 3 < plateau <= 40  # the plateau, then its anneal
    assert [e for n, e, _ in epochs_of_stage if n < 200] == [plateau] * (trajectories.S - 1)
    assert src.protocol()["theta0"] == "plateau-anneal" and src.protocol()["stage_epochs"] == "pretrain"
    epochs_of_stage.clear()
    trajectories.pretrain(src, 0, settings, 1, epochs=3)  # the converged control
    assert epochs_of_stage == [(200, 3, True)]  # cosine, as the source's pre-training says
