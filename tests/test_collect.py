"""The collection job on a real local Ray cluster: consistency, resume, retries, failures."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from collectors import chaos
from collectors.collect import collect as _collect
from collectors.config import sample_specs
from conftest import REPO, arm_victim, tiny_config
from meta import catalog, readers

pytestmark = pytest.mark.ray


def collect(cfg, out, settings, **kw):
    return _collect(sample_specs(cfg), out, settings, cfg.workers, **kw)


def _tensor_digest(sample) -> str:
    h = hashlib.sha256()
    for k in sorted(sample.tensors):
        h.update(k.encode() + sample.tensors[k].tobytes())
    return h.hexdigest()


def assert_consistent(out, expected_ids):
    """Every requested sweep is done exactly once, in a shard that exists and matches its hash."""
    rows = catalog.read(str(out))
    assert sorted(r["sweep_id"] for r in rows) == sorted(expected_ids)
    assert all(r["status"] == "done" for r in rows), [(r["sweep_id"], r["error"]) for r in rows]
    for r in rows:
        shard = out / "shards" / r["shard"]
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == r["shard_sha256"]
        assert len(r["stage_test_acc"]) == r["n_stages"] == len(r["stage_size"])
    samples = list(readers.iter_sweeps(str(out)))
    assert sorted(s.key for s in samples) == sorted(expected_ids)  # no duplicates, no loss
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]  # no temporaries left
    return {s.key: _tensor_digest(s) for s in samples}


def test_collect_resume_and_extend(ray_local, settings, tmp_path):
    out = tmp_path / "meta"
    cfg = tiny_config()
    ids = [s.sweep_id for s in sample_specs(cfg)]
    first = collect(cfg, str(out), settings, num_workers=2)
    assert (first.done, first.failed, first.skipped) == (4, 0, 0) and first.bytes_written > 0
    digests = assert_consistent(out, ids)

    # both readers see the same sweeps; the Ray reader decodes without pickle
    rows = readers.ray_dataset(str(out)).take_all()
    assert sorted(r["sweep_id"] for r in rows) == sorted(ids)
    assert {r["sweep_id"]: _tensor_digest(readers.row_to_sample(r)) for r in rows} == digests

    shards_before = sorted(p.name for p in (out / "shards").iterdir())
    again = collect(cfg, str(out), settings, num_workers=2)
    assert (again.done, again.skipped, again.bytes_written) == (0, 4, 0)
    assert sorted(p.name for p in (out / "shards").iterdir()) == shards_before

    more = tiny_config(num_sweeps=6)
    extended = collect(more, str(out), settings, num_workers=2)
    assert (extended.done, extended.skipped) == (2, 4)
    new_digests = assert_consistent(out, [s.sweep_id for s in sample_specs(more)])
    assert {k: new_digests[k] for k in ids} == digests


def test_sweeps_are_bit_identical_across_runs(ray_local, settings, tmp_path):
    """The same specs collected twice, into two separate folders, give byte-identical samples.

    Determinism is checked on this machine only: digests recorded on another CPU would differ in the
    last float bits wherever oneDNN picks other kernels, so no digest is hard-coded here.
    """
    cfg = tiny_config(num_sweeps=3, space__datasets=["mnist", "cifar10"])
    ids = [s.sweep_id for s in sample_specs(cfg)]
    digests = []
    for run in ("first", "second"):
        out = tmp_path / run
        s = collect(cfg, str(out), settings, num_workers=2)
        assert (s.done, s.failed) == (3, 0)
        digests.append(assert_consistent(out, ids))
    assert sorted(digests[0]) == sorted(ids)
    assert digests[0] == digests[1]


def test_shards_published_but_not_catalogued_are_adopted_not_redone(ray_local, settings, tmp_path):
    out = tmp_path / "meta"
    cfg = tiny_config(num_sweeps=2)
    collect(cfg, str(out), settings, num_workers=1)
    rows = catalog.read(str(out))
    catalog.write(str(out), rows[:1])  # as if the driver died between publishing a shard and the catalog write
    s = collect(cfg, str(out), settings, num_workers=1)
    assert (s.adopted, s.done) == (1, 0)
    assert_consistent(out, [r["sweep_id"] for r in rows])


def test_a_killed_worker_costs_only_a_retry(ray_local, settings, tmp_path, monkeypatch):
    out = tmp_path / "meta"
    cfg = tiny_config(workers__shard_max_seconds=3600)  # sweeps stay unpublished on their worker until the end
    specs, victim, fired = arm_victim(monkeypatch, tmp_path, cfg, 1, "2")
    s = collect(cfg, str(out), settings, num_workers=2)
    assert fired()  # the worker really died
    assert (s.done, s.failed) == (4, 0)
    assert_consistent(out, [x.sweep_id for x in specs])
    attempts = {r["sweep_id"]: r["attempts"] for r in catalog.read(str(out))}
    assert attempts[victim] == 2


def test_a_failed_shard_write_loses_nothing(ray_local, settings, tmp_path, monkeypatch):
    """The open shard is discarded, and every sweep it held is run again: none lost, none half-written."""
    out = tmp_path / "meta"
    cfg = tiny_config(workers__shard_max_seconds=3600)
    specs, victim, fired = arm_victim(monkeypatch, tmp_path, cfg, 2, "write")
    s = collect(cfg, str(out), settings, num_workers=1)
    assert fired()
    assert (s.done, s.failed) == (4, 0)
    assert_consistent(out, [x.sweep_id for x in specs])
    attempts = {r["sweep_id"]: r["attempts"] for r in catalog.read(str(out))}
    assert attempts[victim] == 2 and attempts[specs[0].sweep_id] == 2  # the lost, already finished sweep too


def test_retries_are_bounded_then_the_sweep_is_recorded_failed(ray_local, settings, tmp_path, monkeypatch):
    out = tmp_path / "meta"
    cfg = tiny_config(num_sweeps=2, workers__max_retries=1)
    specs, victim, _ = arm_victim(monkeypatch, tmp_path, cfg, 0, "0", "1")  # dies on both attempts
    s = collect(cfg, str(out), settings, num_workers=1)
    assert (s.done, s.failed) == (1, 1)
    row = {r["sweep_id"]: r for r in catalog.read(str(out))}[victim]
    assert row["status"] == "failed" and row["attempts"] == 2 and "worker died" in row["error"]
    assert victim not in {x.key for x in readers.iter_sweeps(str(out))}
    monkeypatch.delenv(chaos.ENV)
    retried = collect(cfg, str(out), settings, num_workers=1, retry_failed=True)
    assert (retried.done, retried.skipped) == (1, 1)
    assert_consistent(out, [x.sweep_id for x in specs])


def test_a_diverging_sweep_is_recorded_failed_and_not_written(ray_local, settings, tmp_path):
    out = tmp_path / "meta"
    cfg = tiny_config(num_sweeps=2, space__lr=[1e9, 1e9], space__optimizers=["sgd"])
    s = collect(cfg, str(out), settings, num_workers=1)
    assert (s.done, s.failed) == (0, 2)
    rows = catalog.read(str(out))
    assert all(r["status"] == "failed" and "SweepDiverged" in r["error"] for r in rows)
    assert not list((out / "shards").glob("*.tar"))


def test_killing_the_driver_then_rerunning_resumes_without_duplicates(settings, tmp_path):
    out, cfg_path = tmp_path / "meta", tmp_path / "cfg.yaml"
    cfg = tiny_config(num_sweeps=6)
    cfg_path.write_text(cfg.model_dump_json())  # JSON is YAML
    cmd = [sys.executable, str(REPO / "collectors" / "launch.py"), "--config", str(cfg_path), "--out", str(out),
           "--data-root", settings.root, "--unverified-cifar10", "--num-workers", "1", "--no-mlflow"]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if catalog.exists(str(out)) and len(catalog.read(str(out))) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # driver and its local Ray cluster, mid-run
        proc.wait()
    partial = len(catalog.read(str(out)))
    assert 2 <= partial < 6
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{partial} already finished" in rerun.stdout
    digests = assert_consistent(out, [s.sweep_id for s in sample_specs(cfg)])
    # the same as a run that was never interrupted: same sweep ids, same tensors
    clean = tmp_path / "clean"
    cmd[cmd.index(str(out))] = str(clean)
    uninterrupted = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    assert assert_consistent(clean, [s.sweep_id for s in sample_specs(cfg)]) == digests


def test_a_truncated_shard_is_caught_by_verify_and_its_sweeps_alone_are_redone(ray_local, settings, tmp_path, capsys):
    from meta import status

    out = tmp_path / "meta"
    cfg = tiny_config()  # shard_max_seconds 0: a shard per sweep
    first = collect(cfg, str(out), settings, num_workers=2)
    rows = {r["sweep_id"]: r for r in catalog.read(str(out))}
    victim = sorted(rows)[1]
    shard = out / "shards" / rows[victim]["shard"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # as a disk that filled up, or a bad copy
    cut = shard.read_bytes()
    assert status.main([str(out), "--verify"]) == 1
    said = capsys.readouterr().out
    assert f"damaged: shards/{shard.name}" in said and "1 damaged shard" in said

    again = collect(cfg, str(out), settings, num_workers=2)
    assert (again.skipped, again.done, again.failed) == (first.done - 1, 1, 0)
    assert [d.shard for d, _ in again.damaged] == [shard.name] and shard.name in again.text()
    assert (out / "damaged" / shard.name).read_bytes() == cut  # kept aside, not deleted
    assert_consistent(out, list(rows))  # every sweep done once, in an intact shard
    assert status.main([str(out), "--verify"]) == 0
