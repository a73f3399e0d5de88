import pytest

from collectors.config import ConfigError, load_config, parse_config, sample_specs, stage_sizes
from conftest import REPO, tiny_config


@pytest.mark.parametrize(
    "raw, named",
    [
        ({"num_sweeps": 2, "space": {"families": ["cnn", "vgg"]}}, "'vgg'"),
        ({"num_sweeps": 2, "space": {"datasets": ["imagenet"]}}, "'imagenet'"),
        ({"num_sweeps": 2, "space": {"r": [0.5, 1.2]}}, "1.2"),
        ({"num_sweeps": 2, "space": {"r": [0.0, 0.5]}}, "r range"),
        ({"num_sweeps": 2, "space": {"n_stages": 2}}, "space.n_stages"),
        ({"num_sweeps": 2, "space": {"lr": [-1e-3, 1e-3]}}, "-0.001"),
        ({"num_sweeps": 0}, "num_sweeps"),
        ({"num_sweeps": 2, "space": {"colour": "red"}}, "space.colour"),
        ({"num_sweeps": 2, "workers": {"max_retries": -1}}, "workers.max_retries"),
        ({"num_sweeps": 2, "space": {"train_size": 10, "r": [0.3, 0.5]}}, "empty last subset"),
    ],
)
def test_bad_configs_are_rejected_with_the_bad_value(raw, named):
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "cfg.yaml")
    assert named in str(e.value) and "cfg.yaml" in str(e.value)


def test_unreadable_or_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_sweeps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_shipped_demo_config_is_valid():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    specs = sample_specs(cfg)
    assert {s.family for s in specs} == set(cfg.space.families)  # the demo shows every family
    assert {s.dataset for s in specs} == set(cfg.space.datasets)


def test_spec_sampling_is_deterministic_and_extends_stably():
    a, b = sample_specs(tiny_config()), sample_specs(tiny_config())
    assert [s.sweep_id for s in a] == [s.sweep_id for s in b]
    more = sample_specs(tiny_config(num_sweeps=8))
    assert [s.sweep_id for s in more[:4]] == [s.sweep_id for s in a]
    assert len({s.sweep_id for s in more}) == 8
    other = sample_specs(tiny_config(seed=4))
    assert not {s.sweep_id for s in other} & {s.sweep_id for s in a}


def test_sampled_values_stay_in_the_space():
    cfg = tiny_config(num_sweeps=50, space__train_size=2000, space__r=[0.3, 0.9], space__lr=[1e-5, 4e-3], space__batch_size=[32, 256])
    for s in sample_specs(cfg):
        assert 0.3 <= s.r <= 0.9 and 1e-5 * 0.999 <= s.lr <= 4e-3 * 1.001 and 32 <= s.batch_size <= 256
        assert s.family in ("cnn", "resnet")


def test_stage_sizes_shrink_by_r():
    assert stage_sizes(1000, 0.5, 4) == [1000, 500, 250, 125]


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """A config in the repository is one a user runs as it is: it must validate (eval-* are transfer experiments)."""
    if path.name.startswith("eval-"):
        from evaluation.config import load_config as load_transfer

        load_transfer(path)
    else:
        assert sample_specs(load_config(path))
