"""The predictability report on hand-made trajectories whose answers are known."""

import numpy as np
import pytest

from known import predictability as pr
from meta.record import SweepRecord
from meta.shards import Sample
from conftest import REPO


def _sample(traj: np.ndarray, key: str = "abc", acc0: float = 0.9) -> Sample:
    """A sweep whose one conv tensor follows ``traj`` [L, N] (stage 0 = most data)."""
    L, n = traj.shape
    rec = SweepRecord.model_validate({
        "format": 1, "sweep_id": key, "spec": {"family": "cnn", "dataset": "mnist"}, "n_stages": L, "n_params": n,
        "stages": [{"stage": k, "subset_size": 100, "steps": 1, "train_loss": 0.1, "train_acc": 0.9,
                    "test_loss": 0.2 + 0.1 * k, "test_acc": acc0 - 0.01 * k, "wall_s": 1.0} for k in range(L)],
        "wall_s": 1.0, "tensors": [{"name": "w", "shape": [n], "dtype": "float32", "kind": "conv"}], "versions": {}})
    return Sample(key, rec, {"w": traj.astype(np.float32)})


def _conv(sample, knowns=None):
    return pr.sweep_stats(sample, "p", knowns or {}).kinds["conv"]


def test_an_exactly_linear_trajectory_has_an_oracle_of_zero():
    rng = np.random.default_rng(0)
    start, slope = rng.normal(size=5000), rng.normal(size=5000) * 0.1
    traj = start[None] + slope[None] * np.arange(7)[:, None]  # Θk = start + k·slope
    st = _conv(_sample(traj))
    assert st.ratio("oracle-Δ") < 1e-3 and st.ratio("oracle") < 1e-3
    assert st.ratio("linearfit") < 1e-3  # the per-coordinate line extrapolates it exactly too
    assert st.cosine == pytest.approx(1.0)  # every update repeats the last


def test_a_random_walk_cannot_be_predicted():
    rng = np.random.default_rng(1)
    traj = np.cumsum(rng.normal(size=(7, 20000)), axis=0)[::-1]
    st = _conv(_sample(traj))
    assert 0.97 < st.ratio("oracle-Δ") <= 1.0 and 0.97 < st.ratio("oracle") <= 1.0
    assert st.ratio("taskvector") > 1.0  # extrapolating noise makes it worse
    assert abs(st.cosine) < 0.05


def test_a_uniform_shrink_is_seen_by_the_5_value_oracle_but_not_the_centred_one():
    rng = np.random.default_rng(2)
    v = rng.normal(size=20000)
    traj = v[None] + rng.normal(size=(6, 20000)) * 0.01  # weights that barely move (one window: L = 6) …
    traj[0] = 0.8 * traj[1]  # … whose more-data stage is a shrink towards zero
    st = _conv(_sample(traj))
    assert st.ratio("oracle") < 0.1 < 0.9 < st.ratio("oracle-Δ")
    assert st.beyond["raw"] == 0 and st.beyond["scaled"] > 0.5 * st.n  # |target − newest| ≫ the path length


def test_a_path_that_only_grows_in_norm_has_nothing_left_to_predict_in_direction():
    """Θ0 … Θ6 = a fixed direction growing 1% a stage (training order Θ0 → Θ6) plus a small random walk: the norm
    grows at every stage and the 5-value oracle predicts it, but rescaled to the newest input's norm the
    stages are one direction plus noise: no predictor beats keep-newest by much there."""
    rng = np.random.default_rng(5)
    v = rng.normal(size=20000)
    walk = np.cumsum(rng.normal(size=(7, 20000)) * 1e-4, axis=0)  # the noise of SGD: a random walk
    traj = np.stack([(1.01 ** k) * v for k in range(7)]) + walk
    stats = pr.sweep_stats(_sample(traj), "p", {})
    st = stats.kinds["conv"]
    assert st.ratio("oracle") < 0.2  # the shrink back is what there is to predict …
    assert st.ratio("dir:oracle") > 0.9  # … and with the norm taken out, nothing is
    growth = pr.norm_growth([stats], "conv")
    assert growth["norm_grows_every_stage"] == 1.0 and growth["norm_change"] == pytest.approx(1.01 ** 6 - 1, rel=1e-3)
    md = pr.render([stats], [], "x")
    assert "### Norm versus direction" in md and "| p | conv | +6.15% [+6.15%, +6.15%] | 100% |" in md


def test_rescaling_keeps_each_tensors_direction_and_takes_its_norm_from_the_reference_stage():
    from known.windows import rescaled

    rng = np.random.default_rng(6)
    traj = rng.normal(size=(3, 10)).astype(np.float32) * np.array([1, 2, 3])[:, None]
    out = rescaled(traj, [4, 6], ref=1)
    for seg in (slice(0, 4), slice(4, 10)):
        for k in range(3):
            assert np.linalg.norm(out[k, seg]) == pytest.approx(np.linalg.norm(traj[1, seg]), rel=1e-5)
            cos = out[k, seg] @ traj[k, seg] / np.linalg.norm(out[k, seg]) / np.linalg.norm(traj[k, seg])
            assert cos == pytest.approx(1.0, rel=1e-6)


def test_report_counts_unlearned_sweeps_and_leaves_them_out():
    rng = np.random.default_rng(3)
    good = _sample(np.cumsum(rng.normal(size=(7, 100)), axis=0), "a")
    chance = _sample(np.cumsum(rng.normal(size=(7, 100)), axis=0), "b", acc0=0.12)
    stats = [pr.sweep_stats(s, "proto", {}) for s in (good, chance)]
    numbers = pr.summary(stats, [])
    assert numbers["proto"]["sweeps"] == 2 and numbers["proto"]["unlearned"] == 1 and numbers["proto"]["used"] == 1
    assert numbers["proto"]["conv"]["windows"] == 200
    assert pr.summary(stats, [], keep_unlearned=True)["proto"]["conv"]["windows"] == 400
    md = pr.render(stats, [], "python -m known.predictability x")
    assert "| proto | conv | 1 (1) |" in md and "0.900 → 0.890" in md


def test_a_given_known_is_scored_on_the_same_windows():
    from known import registry

    rng = np.random.default_rng(4)
    st = _conv(_sample(np.cumsum(rng.normal(size=(7, 300)), axis=0)), {"K": registry.fresh(0)})
    assert st.ratio("K") > 0 and st.ratio("K") == st.ratio("K")  # counted (not NaN)


def test_cli_writes_the_report_and_refuses_an_empty_root(tmp_path, capsys):
    assert pr.main([str(tmp_path / "nothing"), "--no-mlflow"]) == 2
    assert "nothing" in capsys.readouterr().err
    assert pr.main([str(tmp_path / "nothing"), "--no-mlflow", "--val-fraction", "1.5"]) == 2
    assert "1.5" in capsys.readouterr().err
    assert pr.main([str(REPO / "runs" / "x"), str(tmp_path / "x"), "--no-mlflow"]) == 2  # two protocols, one label
    assert "distinct folder names" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
