import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from collectors import zoo
from known import KnownError, baselines
from known.model import KNOWN, segment_rms
from known.predict import PredictError, infer_kinds, retrodict
from roundoff import assert_within_float32_error, step_error_bound


def test_known_has_the_papers_9425_parameters():
    assert sum(p.numel() for p in KNOWN().parameters()) == 9425


def test_known_output_is_a_bounded_residual_on_the_most_data_value():
    torch.manual_seed(0)
    raw, scaled, rms_model = KNOWN(inputs="raw"), KNOWN(inputs="scaled"), KNOWN(inputs="rms")
    w = torch.randn(100, 5) * 10
    rms = torch.rand(100) + 0.1
    with torch.no_grad():
        assert ((raw.step(w) - w[:, -1]).abs() <= 1 + 1e-5).all()  # the official form: tanh residual
        path = (w[:, 1:] - w[:, :-1]).abs().sum(1)
        assert ((scaled.step(w) - w[:, -1]).abs() <= path * (1 + 1e-6)).all()
        # (float32 rounding of centre + rms·1 − centre: up to ~1e-6 of the centre's magnitude)
        assert ((rms_model.step(w, rms) - w[:, -1]).abs() <= rms + 1e-6 * w[:, -1].abs() + 1e-7).all()
    with pytest.raises(ValueError, match="RMS"):
        rms_model.step(w)
    with pytest.raises(ValueError, match="'centred'"):
        KNOWN(inputs="centred")


def test_rms_known_sees_magnitude_so_it_can_shrink_and_is_scale_equivariant():
    """rms inputs: step(a·w, a·rms) = a·step(w, rms) (any layer scale), but not translation-invariant: a
    weight that never moved at v and one at -v can get opposite updates — a shrink towards zero."""
    torch.manual_seed(0)
    m = KNOWN(inputs="rms").double()
    w = torch.randn(64, 5, dtype=torch.float64)
    rms = torch.rand(64, dtype=torch.float64) + 0.5
    with torch.no_grad():
        assert torch.allclose(m.step(3e-3 * w, 3e-3 * rms), 3e-3 * m.step(w, rms), atol=1e-12)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    frozen = torch.linspace(-1, 1, 41, dtype=torch.float64)[:, None].repeat(1, 5)
    one = torch.ones(41, dtype=torch.float64)
    for _ in range(300):  # learn "shrink by 20%" on weights that never moved
        opt.zero_grad()
        loss, beyond = m.loss(frozen, 0.8 * frozen[:, -1], rms=one)
        loss.backward()
        opt.step()
    assert beyond.item() == 0.0 and loss.item() < 0.02
    with torch.no_grad():
        assert torch.allclose(m.step(frozen, one), 0.8 * frozen[:, -1], atol=0.03)


def test_scaled_known_is_affine_equivariant_and_still_on_weights_that_never_moved():
    """Scaled inputs: step(a·w + b) = a·step(w) + b, so a layer's scale does not change the prediction."""
    torch.manual_seed(0)
    m = KNOWN(inputs="scaled")
    for p in m.parameters():
        p.data.uniform_(-0.5, 0.5)
    w = torch.randn(64, 5, dtype=torch.float64)
    m = m.double()
    with torch.no_grad():
        assert torch.allclose(m.step(3e-3 * w + 0.7), 3e-3 * m.step(w) + 0.7, atol=1e-9)
        frozen = torch.full((4, 5), 0.25, dtype=torch.float64)
        assert torch.allclose(m.step(frozen), frozen[:, -1], rtol=0, atol=1e-11)  # moves by < TINY
        # a target far beyond tanh's reach is clipped in the loss, which stays finite and <= 2, and counted
        loss, beyond = m.loss(frozen, frozen[:, -1] + 1.0)
        assert loss.item() <= 2.0 and beyond.item() == 1.0


@pytest.mark.parametrize("method", baselines.METHODS)
def test_fits_extrapolate_their_own_curve_exactly(method):
    """A window that lies on the fitted curve is continued exactly; taskvector follows its formula."""
    import math

    t = torch.arange(5, dtype=torch.float64)
    phi = {"linearfit": t, "logfit": torch.log1p(t), "expfit": torch.exp(t), "taskvector": t}[method]
    w = (2.0 + 3.0 * phi)[None]
    got = baselines.predict(method, w).item()
    if method == "taskvector":
        assert got == pytest.approx(w[0, 4].item() + 0.2 * (w[0, 4] - w[0, 3]).item())
    else:
        nxt = {"linearfit": 5.0, "logfit": math.log(6.0), "expfit": math.exp(5.0)}[method]
        assert got == pytest.approx(2.0 + 3.0 * nxt, rel=1e-9)


def _stages(model, n=5):
    out = []
    for k in range(n):
        torch.manual_seed(k)
        out.append({name: t + 0.01 * k * torch.randn_like(t) if t.is_floating_point() else t.clone()
                    for name, t in model.state_dict().items()})
    return out


@pytest.mark.parametrize("family", sorted(zoo.FAMILIES))
def test_retrodiction_gives_loadable_state_dicts_for_every_family(family):
    import random

    model = zoo.build(family, zoo.sample_arch(family, random.Random(1)), 3, 10)
    stages = _stages(model)
    preds = retrodict(stages, steps=3, method="linearfit", kinds=zoo.tensor_kinds(model))
    assert len(preds) == 3
    for p in preds:
        model.load_state_dict(p)  # the original architecture takes it as it is
    conv = next(n for n, k in zoo.tensor_kinds(model).items() if k == "conv")
    norm = next(n for n, k in zoo.tensor_kinds(model).items() if k == "norm")
    assert not torch.equal(preds[0][conv], stages[0][conv]) and torch.equal(preds[0][norm], stages[0][norm])
    # iterating shifts the prediction into the window: step 2 continues from step 1
    w = torch.stack([s[conv].flatten() for s in reversed(stages)] + [preds[0][conv].flatten()], 1)[:, 1:]
    assert torch.allclose(preds[1][conv].flatten(), baselines.predict("linearfit", w), atol=1e-5)


def test_known_method_runs_batched_in_chunks_and_matches_unchunked(monkeypatch):
    from known import native

    model = zoo.build("cnn", {"depth": 2, "width": 8, "hidden": 32}, 1, 10)
    stages = _stages(model)
    torch.manual_seed(0)
    models = {k: KNOWN() for k in ("conv", "linear", "bias")}
    a = retrodict(stages, steps=2, models=models, chunk=7)
    b = retrodict(stages, steps=2, models=models, chunk=1 << 20)
    monkeypatch.setenv(native.ENV_SWITCH, "0")  # the torch layout (known/fast.py) computes the same
    native.library.cache_clear()
    c = retrodict(stages, steps=2, models=models, chunk=1024)
    native.library.cache_clear()
    for n in a[1]:
        assert torch.allclose(a[1][n], b[1][n], atol=1e-6), n
        assert torch.allclose(c[1][n], b[1][n], atol=1e-5), n


def test_inferred_kinds_match_the_zoo_on_a_plain_cnn():
    model = zoo.build("cnn", {"depth": 2, "width": 8, "hidden": 32}, 1, 10)
    assert infer_kinds(model.state_dict()) == zoo.tensor_kinds(model)


def test_bad_stages_are_named():
    model = zoo.build("cnn", {"depth": 2, "width": 8, "hidden": 32}, 1, 10)
    stages = _stages(model)
    with pytest.raises(PredictError, match="exactly 5"):
        retrodict(stages[:4], method="taskvector")
    bad = [dict(s) for s in stages]
    bad[2]["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(PredictError, match=r"stage 2: 0\.weight has shape"):
        retrodict(bad, method="taskvector")
    bad = [dict(s) for s in stages]
    bad[3]["5.bias"] = bad[3]["5.bias"].clone()
    bad[3]["5.bias"][0] = float("nan")
    with pytest.raises(PredictError, match=r"stage 3: 5\.bias contains NaN"):
        retrodict(bad, method="taskvector")
    with pytest.raises(PredictError, match="unknown method 'magic'"):
        retrodict(stages, method="magic")
    with pytest.raises(PredictError, match="chunk must be a positive number of scalars, got 0"):
        retrodict(stages, method="known", chunk=0)
    with pytest.raises(PredictError, match=r"needs a KNOWN for \['bias'\]"):
        retrodict(stages, method="known", models={"conv": KNOWN(), "linear": KNOWN()})


def _write_keras_h5(path, model: KNOWN, flat: bool = False) -> None:
    """A hand-made file in Keras' HDF5 weight layout (group/group/kernel:0), from a torch KNOWN."""
    import h5py

    from known.official import layer_map

    sd = model.state_dict()
    with h5py.File(path, "w") as f:
        for keras_name, torch_name in layer_map().items():
            g = f.create_group(keras_name)
            inner = g if flat else g.create_group(keras_name)
            inner["kernel:0"] = sd[f"{torch_name}.weight"].numpy().T
            inner["bias:0"] = sd[f"{torch_name}.bias"].numpy()


def test_official_import_round_trip_maps_every_layer(tmp_path):
    from known.official import load_h5

    torch.manual_seed(3)
    ref = KNOWN()
    for p in ref.parameters():  # distinct values everywhere, so a swapped layer cannot go unnoticed
        p.data.uniform_(-0.5, 0.5)
    _write_keras_h5(tmp_path / "k.h5", ref)
    got = load_h5(tmp_path / "k.h5")
    for (n, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), n
    w = torch.randn(50, 5)
    with torch.no_grad():
        assert torch.equal(ref(w), got(w))


def test_official_import_errors_name_the_file(tmp_path):
    import h5py

    from known.official import load_h5

    with pytest.raises(FileNotFoundError, match="nope.h5"):
        load_h5(tmp_path / "nope.h5")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_group("dense")
    with pytest.raises(ValueError, match=r"bad\.h5: layer 'dense' lacks kernel"):
        load_h5(tmp_path / "bad.h5")


@pytest.mark.realdata
def test_the_authors_weights_load_when_present():
    from pathlib import Path

    from known.official import load_dir

    d = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "known-official"
    if not d.exists():
        pytest.skip("authors' KNOWN files not available")
    models = load_dir(d)
    w = torch.randn(1000, 5) * 0.05
    with torch.no_grad():
        res = models["conv"](w)
    assert res.shape == (1000,) and torch.isfinite(res).all()


def test_predict_cli_writes_loadable_safetensors(tmp_path, capsys):
    import safetensors.torch

    from known.predict import main

    model = zoo.build("cnn", {"depth": 2, "width": 8, "hidden": 32}, 1, 10)
    files = []
    for k, st in enumerate(_stages(model)):
        files.append(tmp_path / f"s{k}.safetensors")
        safetensors.torch.save_file(st, str(files[-1]))
    torch.save(_stages(model)[0], tmp_path / "s0.pt")
    official = tmp_path / "official"
    official.mkdir()
    torch.manual_seed(1)
    for name in ("KNOWN_Conv.h5", "KNOWN_FC.h5", "KNOWN_Bias.h5"):
        _write_keras_h5(official / name, KNOWN())
    for method, extra in (("taskvector", []), ("known-official", ["--official", str(official)])):
        out = tmp_path / method
        stage_args = [str(tmp_path / "s0.pt"), *map(str, files[1:])]
        assert main(["--stages", *stage_args, "--method", method, "--steps", "2", "--out", str(out), *extra]) == 0
        for i in (1, 2):
            model.load_state_dict(safetensors.torch.load_file(str(out / f"step{i}.safetensors")))
    assert main(["--stages", *map(str, files), "--method", "known-official", "--out", str(tmp_path / "x")]) == 2
    assert "--official" in capsys.readouterr().err
    assert main(["--stages", *map(str, files[:4]), str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "y")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_saved_known_keeps_its_input_mode(tmp_path):
    from known import registry

    torch.manual_seed(1)
    models = {"conv": KNOWN(), "linear": KNOWN(inputs="raw"), "bias": KNOWN(inputs="rms")}
    got = registry.load_dir(registry.save_dir(models, tmp_path))
    w, rms = torch.randn(20, 5), torch.rand(20) + 0.1
    for k, m in models.items():
        assert got[k].inputs == m.inputs
        with torch.no_grad():
            assert torch.equal(got[k].step(w, rms), m.step(w, rms))


def test_ship_writes_weights_then_provenance_and_load_finds_them(tmp_path, monkeypatch):
    import json

    from known import registry

    monkeypatch.setattr(registry, "SHIPPED", tmp_path)
    with pytest.raises(FileNotFoundError, match="PROVENANCE.json"):
        registry.load_predictor()
    models = registry.fresh(4, "scaled")
    registry.save_dir(models, tmp_path)  # weights alone, no provenance: an unfinished ship, not loadable
    with pytest.raises(FileNotFoundError, match="PROVENANCE.json"):
        registry.load_predictor()
    registry.ship(models, {"sweeps_done": 7}, tmp_path)
    assert json.loads((tmp_path / "PROVENANCE.json").read_text()) == {"sweeps_done": 7}
    got = registry.load_predictor()
    w = torch.randn(10, 5)
    with torch.no_grad():
        assert torch.equal(got["conv"].step(w), models["conv"].step(w))


def test_relative_sqlite_tracking_uri_is_made_absolute(tmp_path, monkeypatch):
    """Ray Train workers run in other folders: a relative sqlite store would be another, empty file there."""
    from meta import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.tracking_uri("sqlite:///sub/m.db") == f"sqlite:///{tmp_path}/sub/m.db"
    assert tracking.tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert tracking.tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_the_contract_call_uses_the_shipped_known_without_models():
    from known import registry

    model = zoo.build("cnn", {"depth": 2, "width": 8, "hidden": 32}, 1, 10)
    stages = _stages(model)
    preds = retrodict(stages, steps=3, method="known")  # the README's call, no models
    shipped = retrodict(stages, steps=3, method="known", models=registry.load_predictor())
    other = retrodict(stages, steps=3, method="known", models=registry.fresh(9, "rms"))
    conv = "0.weight"
    assert len(preds) == 3 and torch.equal(preds[2][conv], shipped[2][conv])
    assert not torch.equal(preds[0][conv], stages[0][conv]) and not torch.equal(preds[0][conv], other[0][conv])
    for p in preds:
        model.load_state_dict(p, strict=True)
    with pytest.raises(KnownError, match="known-official.*KNOWN_\\*.h5"):
        retrodict(stages, method="known-official")


def test_predict_cli_defaults_to_known_and_a_bad_registry_uri_is_one_line(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    from known.predict import main

    monkeypatch.chdir(tmp_path)
    model = zoo.build("cnn", {"depth": 2, "width": 8, "hidden": 32}, 1, 10)
    files = []
    for k, st in enumerate(_stages(model)):
        files.append(str(tmp_path / f"s{k}.safetensors"))
        safetensors.torch.save_file(st, files[-1])
    assert main(["--stages", *files, "--steps", "1", "--out", str(tmp_path / "out")]) == 0
    pred = safetensors.torch.load_file(str(tmp_path / "out" / "step1.safetensors"))
    assert torch.equal(pred["0.weight"], retrodict([safetensors.torch.load_file(f) for f in files], 1)[0]["0.weight"])
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["--stages", *files, "--known", "models:/KNOWN@champion", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot read models:/KNOWN@champion: no MLflow tracking store at") and "Traceback" not in err
    assert not (tmp_path / "m.db").exists()  # a lookup creates no store
    import mlflow

    mlflow.MlflowClient(uri).search_registered_models()  # now a store, without the model
    assert main(["--stages", *files, "--known", "models:/KNOWN@champion", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's own log lines
    assert err.startswith("error: models:/KNOWN@champion not found in the registry") and "Traceback" not in err


def test_bn_is_reestimated_from_a_users_own_batches():
    from torch import nn

    from known.predict import reestimate_bn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(64, 3, 8, 8) * 2 + 1
    loader = [(x[i : i + 16], torch.zeros(16)) for i in range(0, 64, 16)]  # what a DataLoader yields
    reestimate_bn(model, iter(loader))
    with torch.no_grad():
        assert torch.allclose(model[1].running_mean, model[0](x).mean((0, 2, 3)), atol=1e-5)
    assert not model.training
    with pytest.raises(PredictError, match="no image batches"):
        reestimate_bn(model, [])


@pytest.mark.parametrize("inputs", ["raw", "scaled", "rms"])
def test_fast_layout_computes_known_step_in_any_chunking_and_threads(inputs):
    from known.fast import FastKNOWN

    model, w, rms = _trained_like(inputs)
    want, bound = step_error_bound(model, w, rms)  # exact (float64), and what float32 may lose (tests/roundoff.py)
    assert (want - w[:, -1]).abs().mean() > 1e-4  # a real residual, so a broken layout shows
    fast, intra = FastKNOWN(model), torch.get_num_threads()
    for chunk, threads in ((4096, 1), (1000, 2), (333, 3)):
        assert_within_float32_error(fast.step(w, rms, chunk, threads), want, bound)
    assert torch.get_num_threads() == intra  # the one-thread-per-chunk setting is undone


def _trained_like(inputs: str) -> tuple[KNOWN, torch.Tensor, torch.Tensor]:
    """A KNOWN with trained-like weights (not the near-zero initialisation), windows and their tensor RMS."""
    torch.manual_seed(0)
    model = KNOWN(inputs=inputs)
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    return model, torch.randn(3001, 5).cumsum(1) * 0.01, torch.rand(3001) * 0.05 + 0.01


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("inputs", ["raw", "scaled", "rms"])
def test_native_kernel_computes_known_step_in_any_chunking_and_threads(inputs, monkeypatch, tmp_path):
    from known import native
    from known.fast import NativeKNOWN

    monkeypatch.setenv("OBLIVION_CACHE", str(tmp_path))
    native.library.cache_clear()
    model, w, rms = _trained_like(inputs)
    want, bound = step_error_bound(model, w, rms)  # exact (float64), and what float32 may lose (tests/roundoff.py)
    assert (want - w[:, -1]).abs().mean() > 1e-4  # a real residual, so a broken kernel shows
    layout = NativeKNOWN(model)
    for chunk, threads in ((4096, 1), (1000, 2), (333, 3), (5, 1)):  # 5: every block is a partial one
        assert_within_float32_error(layout.step(w, rms, chunk, threads), want, bound)
    built = list((tmp_path / "native").glob("known-*.so"))
    assert len(built) == 1 and not list((tmp_path / "native").glob("*.tmp"))
    native.library.cache_clear()
    mtime = built[0].stat().st_mtime_ns
    assert native.library() is not None and built[0].stat().st_mtime_ns == mtime  # the cached build is reused
    with pytest.raises(ValueError, match="runs on the CPU"):
        layout.to("meta")
    with pytest.raises(ValueError, match="reads 8545 parameters, this KNOWN packs 8544"):
        native.check_size(layout.params[:-1], unfolded=False)
    native.library.cache_clear()


def test_without_a_compiler_the_torch_layout_runs_and_says_so(monkeypatch, tmp_path, caplog):
    from known import native
    from known.predict import _step

    monkeypatch.setenv("OBLIVION_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    native.library.cache_clear()
    model, w, rms = _trained_like("rms")
    with caplog.at_level("WARNING", logger="known.native"):
        got = _step(w, "known", model, None, [len(w)])
    native.library.cache_clear()
    assert "native kernel is not available" in caplog.text and "no-such-compiler" in caplog.text
    # against float64, within what float32 may lose on any CPU: these inputs are large enough for float32's orderings
    # to differ by 3e-5 (and the step computes the tensor RMS in float32 itself: sizes)
    want, bound = step_error_bound(model, w, sizes=[len(w)])
    with torch.no_grad():
        assert torch.equal(want, model.double().step(w.double(), segment_rms(w[:, -1].double(), [len(w)])))
    assert_within_float32_error(got, want, bound)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("rows, threads", [(1000, 1), (9001, 3)])  # partial blocks; a kind across thread boundaries
def test_native_training_step_gives_torch_autograd_losses_and_gradients(rows, threads, monkeypatch):
    from known import native
    from known.objective import Objective
    from known.windows import KIND_IDS

    torch.manual_seed(1)
    models = {k: KNOWN(inputs="rms") for k in ("bias", "conv", "linear")}  # not KIND_IDS' order
    for p in (p for m in models.values() for p in m.parameters()):
        p.data.normal_(0, 0.3)
    w = torch.randn(rows, 5).cumsum(1) * 0.02
    rms, y = torch.full((rows,), 0.04), torch.randn(rows) * 0.02  # some targets beyond ±1: clipped
    w[:50] *= 25  # rows whose residual saturates the tanh: torch passes no gradient through them
    kind = torch.tensor([KIND_IDS["conv"], KIND_IDS["linear"]], dtype=torch.int8)[torch.randint(0, 2, (rows,))]
    objective = Objective(models, threads=threads)  # no bias rows: its KNOWN still gets a (zero) gradient

    def run():
        objective.flat.grad = None
        total, out = objective(w, y, rms, kind)
        total.backward()
        return total.item(), out, objective.flat.grad.clone()

    calls, kernel = [], native.l1
    monkeypatch.setattr(native, "l1", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    native.library.cache_clear()
    total, out, grads = run()
    assert calls  # the kernel computed it
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native.library.cache_clear()
    want_total, want_out, want = run()  # torch's autograd, kind by kind, on its part of the flat parameter
    native.library.cache_clear()
    assert len(calls) == 1 and set(out) == set(want_out) == {"conv", "linear"}
    assert total == pytest.approx(want_total, rel=1e-5)
    for k in out:
        assert out[k][2] == want_out[k][2] and out[k][1].item() == want_out[k][1].item() > 0
        assert out[k][0].item() == pytest.approx(want_out[k][0].item(), rel=1e-5)
    assert ((grads - want).norm() / want.norm()).item() < 1e-4


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
def test_native_kernel_passes_nan_and_inf_on_as_torch_does():
    from known import native
    from known.fast import NativeKNOWN

    model, w, rms = _trained_like("rms")
    w[0, 2], w[1, 3] = float("nan"), float("inf")  # a diverged KNOWN or input must not look like a prediction
    with torch.no_grad():
        want = model.step(w[:4], rms[:4])
    got = NativeKNOWN(model).step(w[:4], rms[:4], 16, 1)
    assert native.runs(w, model)
    assert torch.equal(got.isnan(), want.isnan()) and got[:2].isnan().all()
    assert_within_float32_error(got[2:], *step_error_bound(model, w[2:4], rms[2:4]))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_triton_kernel_computes_known_step_in_triton_interpreter(tmp_path):
    """The CUDA kernel's arithmetic, run by Triton's CPU interpreter (this machine has no GPU): the same values as
    KNOWN.step in float64, a partial last block, NaN passed on."""
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent("""
        import torch
        from known.gpu import TritonKNOWN
        from known.model import KNOWN
        from roundoff import assert_within_float32_error, step_error_bound
        torch.manual_seed(0)
        m = KNOWN(inputs="rms")
        for p in m.parameters():
            p.data.normal_(0, 0.5)
        w, rms = torch.randn(301, 5).cumsum(1) * 0.01, torch.rand(301) * 0.05 + 0.01
        w[7, 2] = float("nan")
        want, bound = step_error_bound(m, w, rms)  # exact (float64), and what float32 may lose (tests/roundoff.py)
        got = TritonKNOWN(m).step(w, rms, 128)
        assert (want - w[:, -1]).abs().nanmean() > 1e-3
        assert torch.equal(got.isnan(), want.isnan()) and got[7].isnan()
        finite = ~want.isnan()
        assert_within_float32_error(got[finite], want[finite], bound[finite])
        print("ok")
    """))
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
def test_the_step_layout_is_the_kernel_for_float32_on_the_cpu_and_torch_otherwise():
    from known.fast import FastKNOWN, NativeKNOWN
    from known.predict import layout

    model, w, _ = _trained_like("rms")
    assert layout(w, model) is NativeKNOWN
    assert layout(w.double(), model.double()) is FastKNOWN  # the kernel reads float32 only
    assert layout(w[:, :4], KNOWN(n_stages=4)) is FastKNOWN  # and five stages
    assert layout(w.double(), model) is FastKNOWN  # windows and model disagree


def test_the_float64_layout_never_builds_the_kernel(monkeypatch):
    """The C++ kernel reads float32 only: choosing for float64 windows must not compile it (a g++ run) first."""
    from known import native
    from known.fast import FastKNOWN
    from known.predict import layout

    monkeypatch.setattr(native, "library", lambda: pytest.fail("the kernel was built for float64 windows"))
    model = KNOWN().double()
    assert layout(torch.randn(8, 5, dtype=torch.float64), model) is FastKNOWN


@pytest.mark.parametrize("method", ["taskvector", "linearfit", "logfit", "expfit"])
def test_a_baseline_is_a_stepper_like_known(method):
    """``stepper`` hands out baselines through the same interface as KNOWN; chunking changes nothing."""
    from known.predict import stepper

    w = torch.randn(1000, 5, dtype=torch.float64).cumsum(1)
    step, chunk = stepper(method, w)
    assert torch.equal(step.step(w, None, chunk), baselines.predict(method, w))
    assert torch.allclose(step.step(w, None, 7), baselines.predict(method, w), rtol=1e-12, atol=1e-12)  # BLAS order
    with pytest.raises(ValueError, match="nofit"):
        stepper("nofit", w)


def test_the_relative_l1_pools_sums_before_the_ratio():
    """A large window and a small one: the pooled ratio weighs every scalar the same, unlike the mean of the two
    windows' ratios; a predictor never counted in a group reads NaN, not 0."""
    from known.relative_l1 import STEP, PooledL1

    target = torch.zeros(1000)
    total, small = PooledL1(), PooledL1()
    total.add("g", STEP, torch.ones(1000), target)  # keep-newest: 1,000 off
    total.add("g", "p", torch.full((1000,), 0.5), target)  # the predictor halves it: ratio 0.5
    small.add("g", STEP, torch.ones(10), torch.zeros(10))
    small.add("g", "p", torch.full((10,), 2.0), torch.zeros(10))  # doubles it on 10 scalars: ratio 2
    total.update(small)
    assert total.ratio("p", ["g"]) == pytest.approx(520 / 1010)  # the mean of ratios would say 1.25
    assert math.isnan(total.ratio("q", ["g"])) and math.isnan(total.ratio("p", ["h"]))


@pytest.mark.parametrize("device, dtype, stages, native_ok, triton_ok, want", [
    ("cpu", torch.float32, 5, True, False, "NativeKNOWN"),
    ("cpu", torch.float32, 5, False, False, "FastKNOWN"),  # no compiler here
    ("cpu", torch.float64, 5, True, False, "FastKNOWN"),
    ("cpu", torch.float32, 4, True, False, "FastKNOWN"),
    ("cpu", None, 5, True, False, "FastKNOWN"),  # windows and model in different dtypes
    ("cuda", torch.float32, 5, True, False, "FastKNOWN"),  # no Triton
    ("cuda", torch.float64, 5, True, True, "FastKNOWN"),
    ("cpu", torch.float32, 5, False, True, "FastKNOWN"),  # Triton is for CUDA
])
def test_one_place_chooses_the_know_step(device, dtype, stages, native_ok, triton_ok, want):
    from known.predict import choose

    assert choose(device, dtype, stages, native_ok, triton_ok).__name__ == want


def test_shuffled_batches_are_a_seeded_permutation_that_mixes_the_chunks():
    from known.batches import shuffled

    chunks = [{"y": torch.arange(i * 100, (i + 1) * 100), "sweep": torch.full((100,), i)} for i in range(10)]
    batches = list(shuffled(iter(chunks), 32, 150, seed=3))
    rows = torch.cat([b["y"] for b in batches])
    assert sorted(rows.tolist()) == list(range(1000))  # every row once, the rest at the end included
    assert [len(b["y"]) for b in batches[:-1]] == [32] * (len(batches) - 1) and 0 < len(batches[-1]["y"]) <= 32
    assert all(torch.equal(b["sweep"], b["y"] // 100) for b in batches)  # columns move together
    assert min(len(b["sweep"].unique()) for b in batches[:-1]) >= 2  # each batch mixes chunks
    again = torch.cat([b["y"] for b in shuffled(iter(chunks), 32, 150, seed=3)])
    other = torch.cat([b["y"] for b in shuffled(iter(chunks), 32, 150, seed=4)])
    assert torch.equal(rows, again) and not torch.equal(rows, other)


def test_epoch_batches_shuffle_on_the_cpu_and_hand_batches_to_the_device():
    from known.batches import epoch_batches

    class Shard:  # Ray Data's shard: records the device it was asked for (a CUDA worker's default is the GPU)
        def __init__(self):
            self.devices = []

        def iter_torch_batches(self, batch_size, device):
            self.devices.append((batch_size, device))
            return iter([{"y": torch.arange(i * 200, (i + 1) * 200)} for i in range(3)])

    shard = Shard()
    batches = list(epoch_batches(shard, 32, 150, seed=0, device="meta"))
    assert shard.devices == [(150, "cpu")] and sum(len(b["y"]) for b in batches) == 600
    assert all(b["y"].device.type == "meta" for b in batches)


def test_the_knowns_follow_the_objectives_parameter_when_it_is_moved_or_converted():
    from known import registry
    from known.objective import Objective

    models = registry.fresh(0, "rms")
    objective = Objective(models).double()
    weight = models["conv"].values.inp.weight
    assert weight.dtype == torch.float64 and weight.untyped_storage().data_ptr() == objective.flat.untyped_storage().data_ptr()
    with torch.no_grad():
        objective.flat.zero_()
    assert all(not p.any() for m in models.values() for p in m.parameters())


def _ddp_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from known import registry
    from known.objective import Objective, optimizer, train_step, validation_metrics
    from known.windows import KIND_IDS

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different batches on each rank
    models = registry.fresh(rank, "rms")  # and different initial weights: DDP broadcasts rank 0's
    objective = Objective(models)
    opt, wrapped = optimizer(objective, 1e-2), DistributedDataParallel(objective)
    for _ in range(3):
        n = 2048
        batch = {"x": torch.randn(n, 5).cumsum(1) * 0.02, "y": torch.randn(n) * 0.02, "rms": torch.full((n,), 0.04),
                 "kind": torch.tensor([KIND_IDS["conv"], KIND_IDS["linear"]], dtype=torch.int8)[torch.randint(0, 2, (n,))]}
        train_step(wrapped, opt, batch)
    torch.save({k: m.state_dict() for k, m in models.items()}, f"{out}/rank{rank}.pt")
    mine = _validation_batches()[rank::2]  # each rank validates its split, unequal in rows
    (Path(out) / f"val{rank}.json").write_text(json.dumps(validation_metrics(models, mine, across_ranks=True)))
    dist.destroy_process_group()


def _validation_batches() -> list[dict]:
    from known.windows import KIND_IDS

    gen = torch.Generator().manual_seed(5)
    out = []
    for n in (700, 300, 500):
        x = torch.randn(n, 5, generator=gen).cumsum(1) * 0.02
        out.append({"x": x, "y": x[:, -1] + 0.01 * torch.randn(n, generator=gen), "rms": torch.full((n,), 0.04),
                    "kind": torch.tensor(list(KIND_IDS.values()), dtype=torch.int8)[torch.randint(0, 3, (n,), generator=gen)]})
    return out


def test_data_parallel_training_keeps_every_ranks_knowns_equal_and_validates_split(tmp_path):
    """The KNOWNs' parameters are views of the Objective's flat parameter: DDP's first broadcast and every
    averaged step must reach them, so that the checkpointed and validated models are the trained ones. Each rank
    validates its own split of the windows and reports the metrics of all of them."""
    import torch.multiprocessing as mp

    from known import registry
    from known.objective import validation_metrics

    mp.spawn(_ddp_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    start = {k: m.state_dict() for k, m in registry.fresh(0, "rms").items()}
    assert all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])
    moved = {k for k in a if not all(torch.equal(a[k][n], start[k][n]) for n in a[k])}
    assert moved == {"conv", "linear"}  # trained from rank 0's start; no bias rows, so the bias KNOWN stayed
    models = registry.fresh(0, "rms")
    for k, m in models.items():
        m.load_state_dict(a[k])
    whole = validation_metrics(models, _validation_batches())  # one process, every batch
    for r in (0, 1):  # every rank reports the metrics of both splits together
        got = json.loads((tmp_path / f"val{r}.json").read_text())
        assert got.keys() == whole.keys() and all(got[k] == pytest.approx(whole[k], rel=1e-9) for k in whole)


def test_both_kernels_check_the_one_parameter_packing():
    """NativeKNOWN.pack is the one layout: the C++ kernel and the Triton kernel each refuse another length."""
    from known import native
    from known.fast import NativeKNOWN

    packed = NativeKNOWN.pack(KNOWN())
    gpu = pytest.importorskip("known.gpu")  # needs Triton (imports without a GPU)
    assert len(gpu.check_size(packed)) == gpu.PACKED
    with pytest.raises(ValueError, match=f"reads {gpu.PACKED} parameters, this KNOWN packs {gpu.PACKED - 1}"):
        gpu.check_size(packed[:-1])
    if native.library() is not None:
        assert len(native.check_size(packed, unfolded=False)) == len(packed)
        with pytest.raises(ValueError, match="parameters, this KNOWN packs"):
            native.check_size(packed[:-1], unfolded=False)
