"""`python -m meta.status OUT`: the catalog's summary, without Ray (on s3:// in tests/test_s3.py)."""

from meta import catalog, status
from meta.shards import ShardInfo


def _record(sid, family, dataset, wall_s):
    spec = {"family": family, "dataset": dataset, "r": 0.5, "arch": {}, "seed": 1}
    stage = {"subset_size": 10, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.25, "wall_s": wall_s / 3}
    return {"sweep_id": sid, "spec": spec, "n_params": 7, "stages": [stage] * 3, "wall_s": wall_s}


def test_status_counts_reasons_cells_bytes_and_hours(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"x" * 1000)
    shard = ShardInfo("a.tar", str(tmp_path / "shards" / "a.tar"), "0" * 64, 1000, ["s1", "s2"])
    rows = [catalog.done_row(_record("s1", "cnn", "mnist", 1800), shard), catalog.done_row(_record("s2", "cnn", "mnist", 1800), shard),
            catalog.failed_row("s3", {"family": "resnet", "dataset": "cifar10"}, "SweepDiverged: nan\ntraceback", 1),
            catalog.failed_row("s4", {"family": "cnn", "dataset": "mnist"}, "worker died: X (on all 3 attempts)", 3)]
    rows[0]["finished_at"], rows[1]["finished_at"] = "2026-01-01T00:00:00+00:00", "2026-01-01T00:30:00+00:00"
    catalog.write(str(tmp_path), rows)
    st = status.status(str(tmp_path))
    assert (st.done, st.failed, st.shard_bytes, st.cpu_hours, st.sweeps_per_hour) == (2, 2, 1000, 1.0, 2.0)
    assert st.failures == {"SweepDiverged: nan": 1, "worker died: X (on all 3 attempts)": 1}
    assert st.cells == {("cnn", "mnist"): (2, 1), ("resnet", "cifar10"): (0, 1)}
    assert status.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 done, 2 failed" in out and "1,000 bytes" in out and "failed x1: SweepDiverged: nan" in out
    assert "resnet      cifar10       0 done, 1 failed" in out


def test_status_of_a_folder_without_a_catalog_is_an_error_naming_it(tmp_path, capsys):
    assert status.main([str(tmp_path / "nothing")]) == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err
