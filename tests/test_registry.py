"""The KNOWN registry: one predictor loader, pyfunc versions, lineage tags and the champion rule."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from known import KnownError, registry
from known.tracking import use_tracking
from known.train import best_checkpoint, validation_digest, wants_gpu


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    use_tracking(uri, "registry-test")
    yield uri
    mlflow.end_run()


def _windows(n=50, seed=0):
    g = np.random.default_rng(seed)
    w = g.normal(0, 0.05, (n, 5)).cumsum(1).astype(np.float32)
    return pd.DataFrame({**{f"w{i}": w[:, i] for i in range(5)}, "rms": np.full(n, 0.05, np.float32),
                         "kind": np.array(["conv", "linear", "bias"])[np.arange(n) % 3]})


def _publish(models, value, digest, uri, revalidate=None):
    import mlflow

    with mlflow.start_run():
        return registry.publish(models, value, {registry.VAL_DIGEST: digest, "catalog_sha256": "c" * 64}, uri, revalidate)


def test_pyfunc_from_the_registry_predicts_windows_like_the_known_it_registered(tracking):
    import mlflow

    models = registry.fresh(3, "rms")
    version, champion, _ = _publish(models, 0.9, "a", tracking)
    assert champion and version == "1"
    windows = _windows()
    got = mlflow.pyfunc.load_model("models:/KNOWN@champion").predict(windows)
    w = torch.tensor(windows[[f"w{i}" for i in range(5)]].to_numpy())
    for k in ("conv", "linear", "bias"):
        rows = np.flatnonzero(windows["kind"] == k)
        with torch.no_grad():
            want = models[k].step(w[rows], torch.full((len(rows),), 0.05)).numpy()
        np.testing.assert_allclose(got[rows], want, rtol=1e-6)
    assert not np.allclose(got, windows["w4"])  # it predicts, it does not echo the newest value
    tags = mlflow.MlflowClient().get_model_version("KNOWN", "1").tags
    assert tags[registry.VAL_DIGEST] == "a" and tags["catalog_sha256"] == "c" * 64
    # the loader reads the same version's safetensors
    loaded = registry.load_predictor("known", "models:/KNOWN/1", tracking)
    assert torch.equal(loaded["bias"].head.weight, models["bias"].head.weight)


def test_bad_windows_and_bad_uris_are_one_line_errors(tracking):
    with pytest.raises(KnownError, match=r"lack the columns \['rms'\]"):
        registry.predict_windows(registry.fresh(), _windows().drop(columns="rms"))
    with pytest.raises(KnownError, match="models:/KNOWN@nobody not found in the registry"):
        registry.load_predictor("known", "models:/KNOWN@nobody", tracking)


def test_champion_moves_only_on_the_same_validation_set(tracking):
    import mlflow

    client = mlflow.MlflowClient()
    _publish(registry.fresh(1), 0.8, "set-a", tracking)
    # better number, other validation set, no way to re-validate: not compared, champion stays
    version, moved, why = _publish(registry.fresh(2), 0.1, "set-b", tracking)
    assert not moved and "not compared" in why
    # re-validated on the challenger's set the champion does better than its 0.8: it stays
    version, moved, why = _publish(registry.fresh(3), 0.3, "set-b", tracking, revalidate=lambda champion: 0.2)
    assert not moved and "re-validated" in why
    assert str(client.get_model_version_by_alias("KNOWN", "champion").version) == "1"
    # re-validated and worse than the challenger: the alias moves
    version, moved, _ = _publish(registry.fresh(4), 0.3, "set-b", tracking, revalidate=lambda champion: 0.5)
    assert moved and str(client.get_model_version_by_alias("KNOWN", "champion").version) == version == "4"
    # same set: plain comparison
    assert _publish(registry.fresh(5), 0.4, "set-b", tracking)[1] is False
    assert _publish(registry.fresh(6), 0.2, "set-b", tracking)[1] is True


def test_best_checkpoint_is_the_lowest_validation_error_not_the_last():
    results = [("mid", {"step": 5}), ("epoch1", {"step": 10, "val_rel_l1": 0.7}),
               ("epoch2", {"step": 20, "val_rel_l1": 0.9}), ("mid2", {"step": 25}), ("bad", {"val_rel_l1": math.nan})]
    assert best_checkpoint(results)[0] == "epoch1"
    with pytest.raises(ValueError, match="no checkpoint with a finite val_rel_l1"):
        best_checkpoint(results[:1])


def test_gpu_use_follows_the_cluster_or_the_flag():
    assert wants_gpu(None, {"CPU": 16, "GPU": 2}) is True
    assert wants_gpu(None, {"CPU": 2}) is False
    assert wants_gpu(False, {"GPU": 2}) is False and wants_gpu(True, {}) is True


def test_validation_digest_names_the_set_not_its_order():
    assert validation_digest({"a", "b"}) == validation_digest({"b", "a"}) != validation_digest({"a", "c"})
