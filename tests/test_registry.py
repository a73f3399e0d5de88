"""The KNOWN registry: one predictor loader, pyfunc versions, lineage tags and the champion rule."""

import json
import math
import os
import site
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from known import KnownError, registry
from meta.tracking import use_tracking
from known.checkpoint import best_checkpoint
from known.train import wants_gpu
from known.training_run import validation_digest


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


# run with ``python -S`` and only site-packages on the path: no checkout, no editable install of ``known``
CLEAN_LOAD = """
import json, sys
from pathlib import Path
try:
    import known
except ModuleNotFoundError:
    pass
else:
    sys.exit(f"known is importable here, from {known.__file__}")
assert not any(Path(p, "known", "registry.py").exists() for p in sys.path), sys.path
import mlflow, pandas as pd
windows = pd.DataFrame(**json.loads(Path(sys.argv[1]).read_text())["dataframe_split"])
pred = mlflow.pyfunc.load_model("models:/KNOWN@champion").predict(windows)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("known", "meta", "ray", "torchvision"))
Path(sys.argv[2]).write_text(json.dumps({"predictions": pred.tolist(), "heavy": heavy}))
"""


def test_a_registered_known_predicts_where_the_repository_is_not_installed(tracking, tmp_path, recwarn):
    """The version carries its code, an input example and a signature: a clean interpreter (no ``known``) loads
    it and predicts what this process predicts, and so does ``mlflow models predict``."""
    import mlflow

    _publish(registry.fresh(3, "rms"), 0.9, "a", tracking)
    assert not [w for w in recwarn if "type hints" in str(w.message) or "input example" in str(w.message)]
    info = mlflow.models.get_model_info("models:/KNOWN/1")
    assert info.signature.inputs.input_names() == list(registry.WINDOW_COLUMNS) and info.saved_input_example_info
    windows = _windows().astype({c: np.float64 for c in registry.WINDOW_COLUMNS[:-1]})
    request = tmp_path / "windows.json"
    request.write_text(json.dumps({"dataframe_split": {"columns": list(windows.columns), "data": windows.values.tolist()}}))
    want = mlflow.pyfunc.load_model("models:/KNOWN@champion").predict(windows)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages()), "MLFLOW_TRACKING_URI": tracking}
    loaded = subprocess.run([sys.executable, "-S", "-c", CLEAN_LOAD, str(request), str(tmp_path / "loaded.json")],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    got = json.loads((tmp_path / "loaded.json").read_text())
    np.testing.assert_allclose(got["predictions"], want, rtol=1e-6)
    assert got["heavy"] == []  # the pyfunc's code is KNOWN's model and its prediction: no Ray, torchvision, known
    cli = subprocess.run([sys.executable, "-S", "-m", "mlflow", "models", "predict", "-m", "models:/KNOWN@champion",
                          "-i", str(request), "-o", str(tmp_path / "cli.json"), "-t", "json", "--env-manager", "local"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    np.testing.assert_allclose(json.loads((tmp_path / "cli.json").read_text())["predictions"], want, rtol=1e-6)


def test_ship_writes_the_folder_it_is_given_and_leaves_the_package_alone(tmp_path, capsys):
    from meta import catalog

    shipped = {f.name: f.read_bytes() for f in registry.SHIPPED.iterdir() if f.is_file()}
    catalog.append(tmp_path / "coll", [catalog.failed_row("s0", {"family": "cnn"}, "failed in a test", 3)], seq=0)
    models = registry.fresh(4, "rms")
    source = registry.save_dir(models, tmp_path / "saved")
    args = ["ship", "--model", str(source), "--shards", str(tmp_path / "coll")]
    assert registry.main([*args, "--out", str(tmp_path / "out" / "weights")]) == 0
    got = registry.load_predictor("known", str(tmp_path / "out" / "weights"))
    assert torch.equal(got["conv"].head.weight, models["conv"].head.weight)
    provenance = json.loads((tmp_path / "out" / "weights" / "PROVENANCE.json").read_text())
    assert provenance["model"] == str(source) and provenance["catalog_sha256"] == catalog.digest(str(tmp_path / "coll"))
    assert {f.name: f.read_bytes() for f in registry.SHIPPED.iterdir() if f.is_file()} == shipped
    capsys.readouterr()
    (tmp_path / "file").write_text("x")
    assert registry.main([*args, "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {tmp_path / 'file'} is a file" in err
    with pytest.raises(SystemExit) as exit:  # no default: the package's own folder is written only when asked
        registry.main(args)
    assert exit.value.code == 2 and "--out" in capsys.readouterr().err


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
