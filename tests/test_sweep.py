import pytest
import torch

from collectors.config import SweepSpec, sample_specs
from collectors.sweep import SweepDiverged, nested_subsets, run_sweep, to_record
from conftest import tiny_config


def _spec(**over) -> SweepSpec:
    base = sample_specs(tiny_config(space__families=["cnn"], space__datasets=["mnist"]))[0]
    return SweepSpec.model_validate({**base.model_dump(), **over})


def test_same_spec_and_seed_give_a_bit_identical_trajectory(settings):
    spec = _spec()
    a, b = run_sweep(spec, settings), run_sweep(spec, settings)
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert [m.test_acc for m in a.stages] == [m.test_acc for m in b.stages]
    c = run_sweep(_spec(seed=spec.seed + 1), settings)
    assert not torch.equal(a.tensors["0.weight"], c.tensors["0.weight"])


def test_subsets_are_nested_with_sizes_shrinking_by_r():
    spec = _spec(r=0.5, n_stages=5, train_size=200)
    subsets = nested_subsets(1000, spec.train_size, spec.r, spec.n_stages, spec.seed)
    assert [len(s) for s in subsets] == [200, 100, 50, 25, 12]
    for big, small in zip(subsets, subsets[1:]):
        assert set(small.tolist()) <= set(big.tolist())
    assert all(len(set(s.tolist())) == len(s) for s in subsets)  # no repeats
    assert torch.equal(torch.cat(subsets), torch.cat(nested_subsets(1000, spec.train_size, spec.r, spec.n_stages, spec.seed)))


@pytest.mark.parametrize("family", ["cnn", "resnet", "densenet", "shufflenet", "mobilenet"])
def test_sweep_records_every_parameter_and_buffer_at_every_stage(settings, family):
    spec = sample_specs(tiny_config(space__families=[family], space__datasets=["cifar10"], num_sweeps=1))[0]
    res = run_sweep(spec, settings)
    L = spec.n_stages
    assert len(res.stages) == L and [m.stage for m in res.stages] == list(range(L))
    assert [m.subset_size for m in res.stages] == [len(s) for s in nested_subsets(320, spec.train_size, spec.r, spec.n_stages, spec.seed)]
    model_keys = set(res.kinds)
    assert set(res.tensors) == model_keys and any(k.endswith("running_mean") for k in model_keys)
    for k, t in res.tensors.items():
        assert t.shape[0] == L, k
    # the weights move from stage to stage: the sweep really fine-tunes
    conv = next(k for k, kind in res.kinds.items() if kind == "conv")
    assert all(not torch.equal(res.tensors[conv][i], res.tensors[conv][i + 1]) for i in range(L - 1))
    rec = to_record(res)
    assert rec["n_stages"] == L and len(rec["tensors"]) == len(model_keys)
    assert rec["versions"]["torch"] == torch.__version__
    assert rec["finished_at"] == res.finished_at and res.finished_at.endswith("+00:00")  # the catalog's finished_at


def test_training_learns_the_fake_task(settings):
    spec = _spec(pretrain_epochs=4, train_size=256, lr=3e-3, batch_size=32)
    res = run_sweep(spec, settings)
    assert res.stages[0].train_acc > 0.5  # chance is 0.1


def test_diverging_sweep_raises(settings):
    with pytest.raises(SweepDiverged):
        run_sweep(_spec(lr=1e9, optimizer="sgd"), settings)


def test_record_false_keeps_no_tensors_but_trains_the_same(settings):
    spec = _spec()
    a, b = run_sweep(spec, settings), run_sweep(spec, settings, record=False)
    assert b.tensors == {} and [m.test_acc for m in a.stages] == [m.test_acc for m in b.stages]
