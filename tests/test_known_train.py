"""KNOWN meta-training end to end on a tiny collected meta-dataset: Ray Train + MLflow registry."""

import json

import numpy as np
import pytest

from collectors.collect import collect
from collectors.config import sample_specs
from conftest import tiny_config
from known import batches, checkpoint, registry, train
from known import objective as loss
from known.windows import KIND_IDS
from known.windows import is_validation, sweep_windows, window_targets
from meta import catalog, readers

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def meta_root(ray_local, settings, tmp_path_factory):
    out = tmp_path_factory.mktemp("meta")
    cfg = tiny_config(num_sweeps=6, space__families=["cnn"], seed=126)  # seed 126: six CNNs of 2k-13k parameters
    s = collect(sample_specs(cfg), str(out), settings, cfg.workers, num_workers=2)
    assert s.done == 6
    return out


def test_windows_take_s_stages_least_data_first_and_the_next_stage_as_target(meta_root):
    sample = next(readers.iter_sweeps(str(meta_root)))
    L = sample.record.n_stages
    assert window_targets(L) == [0, 1]
    wins = sweep_windows(sample)
    conv = [n for n, k in sample.record.kinds.items() if k == "conv"]
    first = sample.tensors[conv[0]].reshape(L, -1)
    x, y = wins["conv"].x, wins["conv"].y
    n = sum(sample.tensors[c][0].size for c in conv)
    # each row's tensor RMS at its window's most-data input stage (stage 1 for window 0)
    assert wins["conv"].rms[0] == pytest.approx(float((first[1] ** 2).mean() ** 0.5), rel=1e-5)
    assert x.shape == (2 * n, 5) and y.shape == (2 * n,)
    # window k=0: inputs stages 5,4,3,2,1 (least data first), target stage 0; k=1: stages 6..2 -> stage 1
    assert (x[0] == first[[5, 4, 3, 2, 1], 0]).all() and y[0] == first[0, 0]
    assert (x[n] == first[[6, 5, 4, 3, 2], 0]).all() and y[n] == first[1, 0]
    rows = batches.to_rows({"sweep_id": [sample.key], "json": [sample.record.model_dump_json().encode()],
                          "safetensors": [_safetensors(sample)]})
    assert len(rows["y"]) == sum(len(w.y) for w in wins.values()) and rows["x"].shape[1] == 5
    assert set(rows) == {"x", "y", "rms", "kind", "sweep"} and len(set(rows["sweep"].tolist())) == 1
    windows = np.concatenate([np.column_stack([w.x, w.y]) for w in wins.values()])  # every row once, in runs of 64
    got = np.column_stack([rows["x"], rows["y"]])
    assert len(got) % 64 and np.array_equal(got[np.lexsort(got.T)], windows[np.lexsort(windows.T)])


def _safetensors(sample) -> bytes:
    import safetensors.numpy

    return safetensors.numpy.save(sample.tensors)


def test_sweeps_that_never_learned_are_left_out_unless_kept():
    rows = [{"sweep_id": "a", "stage_test_acc": [0.91, 0.9]}, {"sweep_id": "b", "stage_test_acc": [0.14, 0.2]},
            {"sweep_id": "c", "stage_test_acc": [0.16, 0.1]}]  # chance is 0.10; the margin 0.05
    assert [r["sweep_id"] for r in batches.training_rows(rows)] == ["a", "c"]
    assert len(batches.training_rows(rows, keep_unlearned=True)) == 3


def test_size_curve_fractions_are_nested_and_keep_the_validation_sweeps():
    rows = [{"sweep_id": f"{i:016x}"} for i in range(400)]
    (quarter, v1), (half, v2), (full, v3) = (batches.split(rows, 0.2, f) for f in (0.25, 0.5, 1.0))
    assert v1 == v2 == v3 and not (full & v3)
    assert quarter <= half <= full and len(full) + len(v3) == 400
    assert 0.15 < len(quarter) / len(full) < 0.35 and 0.4 < len(half) / len(full) < 0.6


def test_split_is_by_sweep_and_deterministic():
    ids = [f"{i:016x}" for i in range(1000)]
    val = [is_validation(i, 0.2) for i in ids]
    assert 150 < sum(val) < 250 and val == [is_validation(i, 0.2) for i in ids]


def test_train_registers_a_known_and_resumes(meta_root, tmp_path, capsys, monkeypatch):
    import time

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # seconds; a test run is short
    started_ms = time.time() * 1000
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["--shards", str(meta_root), "--batch-size", "4096", "--checkpoint-every", "5", "--val-fraction", "0.34",
            "--storage", str(tmp_path / "train"), "--tracking-uri", uri, "--keep-unlearned"]  # 1-epoch fake sweeps
    assert train.main([*base, "--epochs", "1", "--name", "run"]) == 0
    out = capsys.readouterr().out
    first = _final(out)
    assert first["val_rel_l1_known"] > 0 and first["resumed_from_step"] == 0 and "version 1 (best checkpoint" in out
    assert "as champion" in out
    models = registry.load_predictor("known", "models:/KNOWN@champion", uri)
    assert set(models) == {"conv", "linear", "bias"}
    assert sum(p.numel() for p in models["conv"].parameters()) == 9425
    # the same name again with more epochs continues from the checkpoint instead of starting over
    assert train.main([*base, "--epochs", "2", "--name", "run"]) == 0
    out = capsys.readouterr().out
    second = _final(out)
    assert "registered KNOWN version 2" in out
    assert second["resumed_from_step"] == first["step"] and second["step"] == 2 * first["step"]
    # the resume continued the same MLflow run, which records the meta-dataset it trained on
    from mlflow import MlflowClient

    assert second["run_id"] == first["run_id"]
    run = MlflowClient(uri).get_run(first["run_id"])
    assert run.info.status == "FINISHED" and "resumed_with" in run.data.tags
    # the workers' metrics carry wall time (the UI's time axis), and MLflow's system metrics are there
    history = MlflowClient(uri).get_metric_history(first["run_id"], "train_l1_conv")
    assert history and all(started_ms <= m.timestamp <= time.time() * 1000 for m in history)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    (dataset,) = {i.dataset.name: i for i in run.inputs.dataset_inputs}.values()
    assert dataset.dataset.name == "meta-dataset" and dataset.dataset.digest == registry.catalog_sha256(str(meta_root))[:32]
    # version 2 is the best of the two epoch-end checkpoints, with its lineage
    tags = MlflowClient(uri).get_model_version("KNOWN", "2").tags
    assert float(tags["val_rel_l1"]) == second["best_val_rel_l1"] <= second["val_rel_l1"]
    assert tags["catalog_sha256"] == registry.catalog_sha256(str(meta_root)) and len(tags["validation_sha256"]) == 64


def test_an_unusable_tracking_store_is_refused_before_ray_starts(meta_root, tmp_path, capsys, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the tracking store was checked")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # an unreachable server fails at once
    assert train.main(["--shards", str(meta_root), "--storage", str(tmp_path / "train"), "--keep-unlearned",
                       "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MLflow tracking store http://127.0.0.1:9:") and err.count("\n") == 1


def test_training_that_would_leave_no_cpu_to_stream_the_shards_is_refused(meta_root, tmp_path, capsys, monkeypatch):
    assert train.cpu_shortfall(1, 1, 2, 1) is None
    assert train.cpu_shortfall(2, 1, 2, 3) is None  # several nodes: the cluster may grow
    assert train.cpu_shortfall(1, 4, 0, 1) is None  # a head without CPUs: workers join it
    assert "at most 1 in all" in train.cpu_shortfall(1, 2, 2, 1)
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a 2-CPU laptop, seen by the CLI
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.chdir(tmp_path)
    assert train.main(["--shards", str(meta_root), "--storage", str(tmp_path / "train"), "--keep-unlearned",
                       "--cpus-per-worker", "2", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's own lines about its store
    assert last.startswith("error: --workers 1 × --cpus-per-worker 2 = 2 CPUs, and this one-node cluster has 2")
    assert not (tmp_path / "train").exists()


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--shards", "x", "--val-fraction", "1.5"])
    assert "--val-fraction must be in (0, 1), got 1.5" in capsys.readouterr().err
    assert train.main(["--shards", str(tmp_path)]) == 2
    assert f"no catalog under {tmp_path}" in capsys.readouterr().err
    from meta import catalog
    catalog.append(tmp_path, [catalog.failed_row("s0", {"family": "cnn"}, "failed in a test", 3)], seq=0)
    assert train.main(["--shards", str(tmp_path)]) == 2
    assert "no done sweeps" in capsys.readouterr().err


def test_validation_table_on_held_out_stages(meta_root, settings, tmp_path, capsys):
    from known import validate
    from known.model import KNOWN
    from test_known import _write_keras_h5

    official = tmp_path / "official"
    official.mkdir()
    for name in ("KNOWN_Conv.h5", "KNOWN_FC.h5", "KNOWN_Bias.h5"):
        _write_keras_h5(official / name, KNOWN())
    out_json = tmp_path / "rows.json"
    code = validate.main(["--shards", str(meta_root), "--data-root", settings.root, "--unverified-cifar10",
                          "--methods", "taskvector", "linearfit", "known-official", "--official", str(official),
                          "--json", str(out_json)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| taskvector |" in table and "| known-official |" in table and "12 windows from 6 sweeps" in table
    rows = json.loads(out_json.read_text())
    assert all(0 <= r["acc_taskvector_reestimate"] <= 1 and r["rel_l1_taskvector"] > 0 for r in rows)
    # a fit that keeps the newest values would score exactly 1; the fits move, so they differ from 1
    assert all(abs(r["rel_l1_linearfit"] - 1) > 1e-6 for r in rows)


def test_reestimated_bn_statistics_are_the_exact_batch_statistics():
    import torch
    from torch import nn

    from known.predict import reestimate_bn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    images = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    model(torch.zeros(2, 1, 28, 28))
    from collectors import data

    reestimate_bn(model, "mnist", images, batch=100)  # equal batches: the average of batch means is the mean
    with torch.no_grad():
        feats = model[0](data.normalize("mnist", images))
    assert torch.allclose(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert not model.training


def _train_cmd(meta_root, tmp_path, name, epochs=1):
    import sys

    return [sys.executable, "-m", "known.train", "--shards", str(meta_root), "--epochs", str(epochs), "--batch-size", "1024",
            "--checkpoint-every", "4", "--val-fraction", "0.34", "--storage", str(tmp_path / "train"), "--name", name,
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-register", "--keep-unlearned"]


def _final(stdout: str) -> dict:
    """The result JSON ``known.train`` prints (``{`` alone on its line), wherever other output falls around it."""
    import re

    start = re.search(r"^\{$", stdout, re.M)
    assert start, f"no result JSON in the output: {stdout[-3000:]!r}"
    return json.JSONDecoder().raw_decode(stdout, start.start())[0]


def _registered_checkpoint(run_dir) -> bool:
    """A checkpoint Ray Train will resume from: listed in the controller's snapshot, which is written after the
    folder itself (a kill between the two loses that checkpoint, so waiting for the folder alone is a race)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return bool(json.loads(snapshot.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return False


def test_killed_training_resumes_from_its_checkpoint_and_ends_where_the_uninterrupted_run_ends(meta_root, tmp_path):
    """Failure suite case 5: SIGKILL the whole training job (driver, Ray, workers) once a checkpoint exists;
    the same command resumes from it, skips the batches the checkpoint had trained and ends where an
    uninterrupted run ends. When a resume replayed its epoch's first batches, it ended 2-12% worse (4 of 4 runs),
    across the noise between seeds (0.78-0.86 for seeds 0-4); skipping them it ended bit-identical (seeds 0-2)."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "RAY_ADDRESS": "local"}  # a fresh local Ray per run, never someone else's cluster
    err = tmp_path / "killed.stderr"
    with err.open("wb") as sink:
        killed = subprocess.Popen(_train_cmd(meta_root, tmp_path, "killed"), cwd=tmp_path, env=env,
                                  start_new_session=True, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and killed.poll() is None:
            if _registered_checkpoint(tmp_path / "train" / "killed"):
                break
            time.sleep(0.2)
        assert killed.poll() is None, (f"training ended (exit {killed.returncode}) before it could be killed: "
                                       f"{err.read_text(errors='replace')[-3000:]}")
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    resumed = subprocess.run(_train_cmd(meta_root, tmp_path, "killed"), cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = subprocess.run(_train_cmd(meta_root, tmp_path, "full"), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    a, b = _final(resumed.stdout), _final(full.stdout)
    assert a["resumed_from_step"] > 0  # it did not start over
    assert a["step"] == b["step"]  # no batch trained twice, none left out
    assert a["val_rel_l1_known"] == pytest.approx(b["val_rel_l1_known"], rel=1e-3)  # (margin: summation order)


def test_restore_round_trips_and_refuses_another_input_mode(tmp_path):
    import torch

    from known.model import KNOWN

    models = registry.fresh(1)
    objective = loss.Objective(models)
    opt = loss.optimizer(objective, lr=1e-3)
    objective.flat.grad = torch.randn_like(objective.flat)
    opt.step()
    progress = checkpoint.Progress(epoch=2, step=37, batches=5, mixing=[31.0, 5])
    progress.sums["bias"] = [1.5, 0.25, 80]
    checkpoint.save(models, opt, progress, d=str(tmp_path))
    again = registry.fresh(2)
    objective2 = loss.Objective(again)
    opt2 = loss.optimizer(objective2, lr=1e-3)
    assert checkpoint.restore(again, opt2, str(tmp_path)) == progress  # mid-epoch: 5 batches to skip, their metrics
    assert all(torch.equal(again["conv"].state_dict()[n], t) for n, t in models["conv"].state_dict().items())
    assert torch.equal(objective2.flat, objective.flat)  # the models' parameters are views of the trained one
    assert torch.equal(opt2.state[objective2.flat]["exp_avg"], opt.state[objective.flat]["exp_avg"])
    raw = {k: KNOWN(inputs="raw") for k in models}  # a checkpoint of the official (raw-input) kind
    with pytest.raises(ValueError, match="inputs='rms'"):
        checkpoint.restore(raw, loss.optimizer(loss.Objective(raw), 1e-3), str(tmp_path))


def test_a_checkpoint_of_per_kind_optimisers_resumes_as_the_flat_one_would_have(tmp_path):
    """Checkpoints written before the flat parameter hold one Adam per kind: resuming one continues the same
    moments, so the next step is the step the per-kind Adams would have taken."""
    import torch

    models = registry.fresh(1)
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    torch.manual_seed(0)
    for _ in range(2):
        for m in models.values():
            for p in m.parameters():
                p.grad = torch.randn_like(p)
        for o in opts.values():
            o.step()
    registry.save_dir(models, tmp_path)
    torch.save({k: o.state_dict() for k, o in opts.items()}, tmp_path / "optimizers.pt")
    (tmp_path / "progress.json").write_text('{"epoch": 1, "step": 2}')
    grads = [torch.randn_like(p) for m in models.values() for p in m.parameters()]
    for g, p in zip(grads, (p for m in models.values() for p in m.parameters())):
        p.grad = g
    resumed = registry.fresh(2)
    objective = loss.Objective(resumed)
    opt = loss.optimizer(objective, lr=1e-3)
    assert checkpoint.restore(resumed, opt, str(tmp_path)) == checkpoint.Progress(epoch=1, step=2)  # no batch count: epoch 1 restarts
    for o in opts.values():  # the old optimisers' third step
        o.step()
    objective.flat.grad = torch.cat([g.reshape(-1) for g in grads])
    opt.step()  # the flat one's
    want = torch.cat([p.detach().reshape(-1) for m in models.values() for p in m.parameters()])
    assert torch.allclose(objective.flat.detach(), want, atol=1e-7) and not torch.equal(want, torch.cat(
        [p.detach().reshape(-1) for m in registry.fresh(1).values() for p in m.parameters()]))
    state = torch.load(tmp_path / "optimizers.pt", weights_only=True)
    del state["bias"]["state"][3]  # a tensor without moments: the rest would land on the wrong parameters
    torch.save(state, tmp_path / "optimizers.pt")
    with pytest.raises(ValueError, match="covers 28267 parameters, the KNOWNs have 28275"):
        checkpoint.restore(resumed, opt, str(tmp_path))


def test_predictability_report_of_a_collected_meta_dataset_goes_to_file_and_mlflow(meta_root, tmp_path):
    from mlflow import MlflowClient

    from known import predictability

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "report.md"
    assert predictability.main([str(meta_root), "--out", str(out), "--known", "shipped", "--keep-unlearned",
                                "--tracking-uri", uri]) == 0
    text = out.read_text()
    label = meta_root.name
    assert f"| {label} | conv | 6 (" in text and "KNOWN shipped" in text and "Regenerate: `python -m known.predictability" in text
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("predictability").experiment_id])
    assert 0 < run.data.metrics[f"{label}.conv.oracle"] <= 1.01 * run.data.metrics[f"{label}.conv.oracle-delta"]  # (IRLS fits)


@pytest.mark.parametrize("inputs", ["raw", "scaled", "rms"])
def test_validation_metrics_are_known_steps_relative_l1(inputs):
    """The workers' validation (KNOW's native layout, built once per call) scores what ``KNOWN.step`` predicts,
    per kind and overall, also on a batch that lacks a kind."""
    import torch

    from known.model import PREDICTED_KINDS

    models = registry.fresh(7, inputs)
    with torch.no_grad():  # away from the near-identity initialisation, so the residual matters
        for m in models.values():
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(0)

    def batch(n, kinds):
        x = torch.randn(n, 5, generator=gen).cumsum(1) * 0.01
        return {"x": x, "y": x[:, -1] + 0.01 * torch.randn(n, generator=gen), "rms": 0.05 + torch.rand(n, generator=gen),
                "kind": torch.tensor(kinds)[torch.randint(len(kinds), (n,), generator=gen)]}

    ids = KIND_IDS
    batches = [batch(900, [ids[k] for k in PREDICTED_KINDS]), batch(300, [ids["conv"], ids["bias"]])]
    got = loss.validation_metrics(models, batches)
    err, step = {k: 0.0 for k in PREDICTED_KINDS}, {k: 0.0 for k in PREDICTED_KINDS}
    for b in batches:
        for k in PREDICTED_KINDS:
            m = b["kind"] == ids[k]
            with torch.no_grad():
                err[k] += (models[k].step(b["x"][m], b["rms"][m]) - b["y"][m]).abs().sum().item()
            step[k] += (b["x"][m][:, -1] - b["y"][m]).abs().sum().item()
    for k in PREDICTED_KINDS:
        assert got[f"val_rel_l1_known_{k}"] == pytest.approx(err[k] / step[k], rel=1e-5)
    assert got["val_rel_l1_known"] == pytest.approx(sum(err.values()) / sum(step.values()), rel=1e-5)
    assert abs(got["val_rel_l1_known"] - 1) > 0.01  # the models' residuals moved the prediction off Θ0


def _read_together(splits) -> list[list[int]]:
    """Each split's row ids, the splits read at once (a streaming split serves its readers together)."""
    import threading

    rows = [[] for _ in splits]

    def take(i):
        rows[i] = [r["id"] for r in splits[i].iter_rows()]

    readers_ = [threading.Thread(target=take, args=(i,)) for i in range(len(splits))]
    for t in readers_:
        t.start()
    for t in readers_:
        t.join(timeout=120)
    return rows


def test_ingest_splits_validation_among_workers_without_dropping_a_window(ray_local):
    from known.ingest import Ingest

    ds = ray_local.data.range(1001, override_num_blocks=7)
    val = _read_together([split["val"] for split in Ingest().configure({"val": ds}, 2, None, None)])
    assert sorted(val[0] + val[1]) == list(range(1001))  # every window once, the odd one too
    [one] = Ingest().configure({"val": ds}, 1, None, None)
    assert sorted(r["id"] for r in one["val"].iter_rows()) == list(range(1001))
    training = _read_together([split["train"] for split in Ingest().configure({"train": ds}, 2, None, None)])
    assert [len(t) for t in training] == [500, 500]  # equal (DDP's ranks step together): Ray drops the odd row


def test_two_workers_validate_their_splits_and_report_every_window(meta_root, tmp_path):
    """A two-worker job: each worker validates half the windows; the reported validation is that of the whole
    validation set, as the driver measures it on the same checkpoint."""
    import os
    import subprocess

    import torch

    env = {**os.environ, "RAY_ADDRESS": "local"}
    cmd = _train_cmd(meta_root, tmp_path, "two") + ["--num-workers", "2", "--cpus-per-worker", "0.5"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = _final(done.stdout)
    [last] = [d for d in (tmp_path / "train" / "two").glob("checkpoint_*") if d.is_dir()
              if json.loads((d / checkpoint.PROGRESS_FILE).read_text())["epoch"] == 1]
    models = registry.load_dir(last)
    _, val_ids = batches.split(batches.training_rows([r for r in catalog.read(str(meta_root)) if r["status"] == "done"],
                                                 keep_unlearned=True), 0.34)
    val = readers.ray_dataset(str(meta_root), where=lambda r: r["sweep_id"] in val_ids).map_batches(batches.to_rows, batch_size=16)
    with torch.no_grad():
        want = loss.validation_metrics(models, val.iter_torch_batches(batch_size=1024))
    for k in ("val_rel_l1_known", "val_rel_l1_known_conv", "val_rel_l1_taskvector"):
        assert final[k] == pytest.approx(want[k], rel=1e-5), k
