"""The command line: bad input is refused before Ray starts; the real `ray job submit` path works."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from collectors import launch
from collectors.fake_cluster import free_port
from conftest import REPO, tiny_config
from meta import catalog


def _run(capsys, *argv):
    code = launch.main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text(tiny_config().model_dump_json())
    return p


def test_bad_config_is_refused_naming_the_value(capsys, tmp_path, fake_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_sweeps: 2\nspace: {families: [vgg], r: [0.5, 1.5]}\n")
    code, err = _run(capsys, "--config", str(bad), "--out", str(tmp_path / "o"), "--data-root", str(fake_root))
    assert code == 2 and "'vgg'" in err and "1.5" in err
    assert not (tmp_path / "o").exists()


def test_missing_data_root_and_missing_dataset(capsys, tmp_path, cfg_file, monkeypatch):
    monkeypatch.delenv("OBLIVION_DATA", raising=False)
    code, err = _run(capsys, "--config", str(cfg_file), "--out", str(tmp_path / "o"))
    assert code == 2 and "--data-root" in err and "OBLIVION_DATA" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("OBLIVION_DATA", str(empty))
    code, err = _run(capsys, "--config", str(cfg_file), "--out", str(tmp_path / "o"))
    assert code == 2 and str(empty) in err and "raw/train-images-idx3-ubyte" in err


def test_rebuilt_cifar_needs_the_explicit_flag(fake_root):
    from collectors import data

    with pytest.raises(data.DataError, match="--unverified-cifar10"):
        data.load("cifar10", data.DataSettings(str(fake_root)), True)
    assert len(data.load("cifar10", data.DataSettings(str(fake_root), unverified_cifar10=True), True)) == 320


def test_unwritable_output_is_refused(capsys, tmp_path, cfg_file, fake_root):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run(capsys, "--config", str(cfg_file), "--out", str(blocker / "o"), "--data-root", str(fake_root),
                     "--unverified-cifar10")
    assert code == 2 and "not writable" in err


def test_a_corrupt_catalog_is_refused_before_ray_starts_and_kept(capsys, tmp_path, cfg_file, fake_root):
    from known import train

    out = tmp_path / "o"
    out.mkdir()
    (out / "catalog.parquet").write_bytes(b"not parquet")
    code, err = _run(capsys, "--config", str(cfg_file), "--out", str(out), "--data-root", str(fake_root),
                     "--unverified-cifar10")
    assert code == 2 and str(out) in err and "not a readable catalog" in err
    assert train.main(["--shards", str(out)]) == 2 and "not a readable catalog" in capsys.readouterr().err
    assert (out / "catalog.parquet").read_bytes() == b"not parquet"  # nothing overwritten


@pytest.mark.ray
def test_ray_job_submit_smoke(tmp_path, fake_root):
    """`ray start --head` + `ray job submit … collectors/launch.py` + `ray stop`, as docs/collection.md says."""
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        ray_bin = Path(shutil.which("ray"))
    # Ray >= 2.5x turns on token auth at `ray start --head`; the CLI then needs RAY_AUTH_MODE=token.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(tiny_config(num_sweeps=2, space__families=["cnn"]).model_dump_json())
    out = tmp_path / "meta"
    start = [str(ray_bin), "start", "--head", "--num-cpus", "2", "--port", str(port), "--node-ip-address", "127.0.0.1",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--disable-usage-stats",
             # the agents' default ports would collide with any other Ray cluster on this machine
             *[a for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                              "--metrics-export-port", "--ray-client-server-port") for a in (flag, str(free_port()))],
             "--temp-dir", ray_tmp]
    # --block: the cluster lives as long as this process, so stopping it stops only this cluster
    # (`ray stop` would stop every Ray cluster on the machine, a user's own included)
    head = subprocess.Popen([*start, "--block"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):  # ready when the job server answers (the dashboard starts after the GCS)
            probe = subprocess.run([str(ray_bin), "job", "list", "--address", f"http://127.0.0.1:{dash}"], env=env,
                                   capture_output=True, timeout=60)
            if probe.returncode == 0:
                break
            time.sleep(1)

        def submit(*entrypoint):
            for _ in range(30):  # the job agent comes up a little after the job server answers, later on a busy machine
                job = subprocess.run([str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                                      "--working-dir", str(REPO), "--", *entrypoint],
                                     env=env, capture_output=True, text=True, timeout=400)
                if job.returncode == 0 or "No available agent" not in job.stderr:
                    return job
                time.sleep(2)
            return job

        job = submit("python", "collectors/launch.py", "--config", str(cfg), "--out", str(out), "--data-root", str(fake_root),
                     "--unverified-cifar10")
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "2 done now" in job.stdout and "succeeded" in job.stdout + job.stderr
        # the evaluation is a Ray job too: its fine-tunes run as tasks on this cluster, its runs land in MLflow
        import yaml
        from test_evaluation import BASE

        ecfg, uri = tmp_path / "eval.yaml", f"sqlite:///{tmp_path}/mlflow.db"
        ecfg.write_text(yaml.safe_dump(BASE))
        job = submit("python", "-m", "evaluation.transfer", "--config", str(ecfg), "--data-root", str(fake_root), "--tracking-uri", uri)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert [r["status"] for r in catalog.read(str(out))] == ["done", "done"]
    from mlflow import MlflowClient

    from evaluation.transfer import EXPERIMENT, ROLE_TAG

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get(ROLE_TAG) == "experiment"] == ["FINISHED"]
    assert sum(r.data.tags.get(ROLE_TAG) == "finetune" for r in runs) == 22  # 11 initialisations × 2 seeds


@pytest.mark.realdata
def test_real_datasets_load_with_their_true_sizes(real_root):
    from collectors import data

    for name, (n_train, n_test) in {"mnist": (60000, 10000), "fashionmnist": (60000, 10000)}.items():
        s = data.DataSettings(str(real_root))
        assert (len(data.load(name, s, True)), len(data.load(name, s, False))) == (n_train, n_test)
    if "real" in real_root.name:  # the rebuilt ../shared/data copy is never loaded silently
        with pytest.raises(data.DataError, match="--unverified-cifar10"):
            data.load("cifar10", data.DataSettings(str(real_root)), False)
    cifar = data.load("cifar10", data.DataSettings(str(real_root), unverified_cifar10=True), True)
    assert cifar.x.shape == (50000, 3, 32, 32) and cifar.y.bincount().tolist() == [5000] * 10


def test_rebuilt_cifar_without_the_flag_is_refused_before_ray_starts(capsys, tmp_path, cfg_file, fake_root, monkeypatch):
    import ray

    def no_ray(*a, **k):
        raise AssertionError("Ray was started although the input is bad")

    monkeypatch.setattr(ray, "init", no_ray)
    code, err = _run(capsys, "--config", str(cfg_file), "--out", str(tmp_path / "o"), "--data-root", str(fake_root), "--no-mlflow")
    assert code == 2 and "cifar10" in err and "--unverified-cifar10" in err
    assert not (tmp_path / "o").exists()


def test_the_pool_size_comes_from_the_flag_else_the_config(capsys, tmp_path, fake_root, monkeypatch):
    import collectors.collect

    asked = []

    def fake_collect(specs, out, settings, workers, num_workers, *a, **k):
        asked.append(num_workers)
        raise SystemExit(0)  # nothing to run: only the request matters here

    monkeypatch.setattr(collectors.collect, "collect", fake_collect)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(tiny_config(workers__num_workers=6).model_dump_json())
    argv = ["--config", str(cfg), "--out", str(tmp_path / "o"), "--data-root", str(fake_root), "--unverified-cifar10", "--no-mlflow"]
    for extra in ([], ["--num-workers", "3"]):
        with pytest.raises(SystemExit):
            launch.main(argv + extra)
    assert asked == [6, 3]


def test_runs_as_a_module_too(tmp_path, fake_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_sweeps: 0\n")
    p = subprocess.run([sys.executable, "-m", "collectors.launch", "--config", str(bad), "--out", str(tmp_path / "o"),
                        "--data-root", str(fake_root)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "num_sweeps" in p.stderr


@pytest.mark.ray
def test_exit_codes_and_the_live_view_in_mlflow(capsys, tmp_path, fake_root, ray_local):
    """0 when every sweep is done (the MLflow run says so, per family x dataset); 1 when some failed, even
    with MLflow unreachable; the summary names why."""
    from mlflow import MlflowClient

    from collectors.progress import EXPERIMENT

    cfg, uri = tmp_path / "ok.yaml", f"sqlite:///{tmp_path}/mlflow.db"
    cfg.write_text(tiny_config(num_sweeps=2).model_dump_json())
    common = ["--data-root", str(fake_root), "--unverified-cifar10", "--num-workers", "2"]
    assert launch.main(["--config", str(cfg), "--out", str(tmp_path / "ok"), "--tracking-uri", uri, *common]) == 0
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["sweeps_done"] == 2
    cells = {k: v for k, v in run.data.metrics.items() if k.startswith("done.")}
    assert sum(cells.values()) == 2 and all(k.count(".") == 2 for k in cells)

    bad = tmp_path / "diverges.yaml"
    bad.write_text(tiny_config(num_sweeps=2, space__lr=[1e9, 1e9], space__optimizers=["sgd"]).model_dump_json())
    capsys.readouterr()
    code = launch.main(["--config", str(bad), "--out", str(tmp_path / "bad"), "--tracking-uri", f"http://127.0.0.1:{free_port()}", *common])
    out = capsys.readouterr().out
    assert code == 1 and "2 failed now" in out and "SweepDiverged" in out
    assert [r["status"] for r in catalog.read(str(tmp_path / "bad"))] == ["failed", "failed"]
    # and again without --retry-failed: nothing runs, still not every sweep is done
    assert launch.main(["--config", str(bad), "--out", str(tmp_path / "bad"), "--no-mlflow", *common]) == 1
    out = capsys.readouterr().out
    assert "2 already finished" in out and "failed in an earlier run x1: SweepDiverged" in out


@pytest.mark.ray
def test_a_stop_publishes_what_ran_exits_3_and_the_same_command_resumes(capsys, tmp_path, fake_root, ray_local,
                                                                        monkeypatch):
    """A stop (here after the first sweep; --stop-after and Ctrl-C set the same event) starts no new sweep: what
    ran is published and catalogued, the rest is left, exit 3; the same command then finishes the job."""
    import threading

    from collectors import collect as collect_mod

    cfg, out = tmp_path / "cfg.yaml", tmp_path / "meta"
    cfg.write_text(tiny_config(num_sweeps=4).model_dump_json())
    argv = ["--config", str(cfg), "--out", str(out), "--data-root", str(fake_root), "--unverified-cifar10",
            "--no-mlflow", "--num-workers", "1"]
    real_collect = collect_mod.collect

    def stop_after_first(*args, stop, on_progress, **kw):
        def progress(summary):
            if summary.completed >= 1:
                stop.set()
        assert isinstance(stop, threading.Event) and not stop.is_set()
        return real_collect(*args, stop=stop, on_progress=progress, **kw)

    monkeypatch.setattr(collect_mod, "collect", stop_after_first)
    assert launch.main(argv) == 3
    printed = capsys.readouterr().out
    assert "1 done now" in printed and "stopped as asked: 3 sweeps not started" in printed
    rows = catalog.read(str(out))
    assert [r["status"] for r in rows] == ["done"] and (out / "shards" / rows[0]["shard"]).exists()
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]  # published, no temporaries

    monkeypatch.setattr(collect_mod, "collect", real_collect)
    assert launch.main(argv) == 0
    assert "1 already finished" in capsys.readouterr().out
    assert sorted(r["status"] for r in catalog.read(str(out))) == ["done"] * 4


def test_the_first_ctrl_c_asks_for_a_stop_the_second_aborts_and_the_timer_stops_too(monkeypatch):
    handlers = {}
    monkeypatch.setattr(launch.signal, "signal", lambda signum, handler: handlers.__setitem__(signum, handler))
    stop = launch._stop_event(None)
    assert not stop.is_set()
    handlers[signal.SIGINT](signal.SIGINT, None)
    assert stop.is_set()
    with pytest.raises(KeyboardInterrupt):
        handlers[signal.SIGINT](signal.SIGINT, None)
    assert launch._stop_event(0.05).wait(timeout=10)
