"""`python -m meta.status OUT`: the catalog's summary, without Ray (on s3:// in tests/test_s3.py)."""

from meta import catalog, status
from meta.record import FORMAT_VERSION
from meta.shards import ShardInfo


def _row(sid, status_, family, dataset, wall_s=None, finished_at=None, error=None):
    """A catalog row with only the columns meta.status reads (catalog.write fills the rest with nulls)."""
    return {"sweep_id": sid, "status": status_, "family": family, "dataset": dataset, "wall_s": wall_s, "error": error,
            "finished_at": finished_at, "r": 0.5, "stage_test_acc": [0.5, 0.25, 0.125] if status_ == "done" else None}


def test_status_counts_reasons_cells_bytes_and_hours(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"x" * 1000)
    catalog.write(str(tmp_path), [
        _row("s1", "done", "cnn", "mnist", 1800, "2026-01-01T00:00:00+00:00"),
        _row("s2", "done", "cnn", "mnist", 900, "2026-01-01T00:30:00+00:00"),
        _row("s3", "failed", "resnet", "cifar10", error="SweepDiverged: nan\ntraceback"),
        _row("s4", "failed", "cnn", "mnist", error="worker died: X (on all 3 attempts)"),
    ])
    st = status.status(str(tmp_path))
    assert (st.done, st.failed, st.shard_bytes, st.cpu_hours, st.sweeps_per_hour) == (2, 2, 1000, 0.75, 2.0)
    assert st.failures == {"SweepDiverged: nan": 1, "worker died: X (on all 3 attempts)": 1}
    assert st.cells == {("cnn", "mnist"): (2, 1), ("resnet", "cifar10"): (0, 1)}
    assert st.longest == {("cnn", "mnist"): 1800}  # what --stop-after must leave room for
    assert status.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 done, 2 failed" in out and "1,000 bytes" in out and "failed x1: SweepDiverged: nan" in out
    # stage accuracies 0.5, 0.25, 0.125 in both done sweeps: Θ1 25 points below Θ0, the last 37.5
    assert st.forgetting == status.Forgetting(2, 0, -25.0, -37.5)
    assert "Θ0 → Θ1 -25.00 points on average, Θ0 → last stage -37.50; Θ1 tests better than Θ0 in 0 of 2" in out
    assert "resnet      cifar10       0 done, 1 failed\n" in out and "cnn         mnist         2 done, 1 failed; longest sweep 30.0 min" in out


def test_status_of_a_folder_without_a_catalog_is_an_error_naming_it(tmp_path, capsys):
    assert status.main([str(tmp_path / "nothing")]) == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err


def test_forgetting_counts_first_stages_that_test_better_and_skips_short_sweeps():
    import pyarrow as pa

    accs = pa.chunked_array([[[0.8, 0.9, 0.5], [0.6]], [None, [0.7, 0.6, 0.65, 0.4]]])
    f = status._forgetting(accs)
    assert (f.sweeps, f.first_better) == (2, 1)
    assert abs(f.first_change - 0.0) < 1e-9 and abs(f.last_change - (-30.0 - 30.0) / 2) < 1e-9
    assert status._forgetting(pa.chunked_array([[[0.5]]])) is None


def test_the_rate_counts_when_sweeps_ended_not_when_their_shard_was_published(tmp_path):
    """Shards close in batches (every 30 min, or all at a stop): two sweeps that ended 30 minutes apart and were
    published together are 2 sweeps an hour, not thousands (what a 14-minute run once reported)."""
    shard = ShardInfo("w0-000000.tar", str(tmp_path / "w0-000000.tar"), "0" * 64, 10)
    stage = {"stage": 0, "subset_size": 8, "steps": 1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
             "test_acc": 0.5, "wall_s": 1.0}
    rows = [catalog.done_row({"format": FORMAT_VERSION, "sweep_id": sid, "spec": {"family": "cnn", "dataset": "mnist"},
                              "n_stages": 1, "n_params": 1, "stages": [stage], "wall_s": 1.0, "tensors": [],
                              "versions": {}, "finished_at": at}, shard)
            for sid, at in (("s1", "2026-01-01T00:00:00+00:00"), ("s2", "2026-01-01T00:30:00+00:00"))]
    assert [r["finished_at"] for r in rows] == ["2026-01-01T00:00:00+00:00", "2026-01-01T00:30:00+00:00"]
    catalog.write(str(tmp_path), rows)
    assert status.status(str(tmp_path)).sweeps_per_hour == 2.0
