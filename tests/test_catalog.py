"""The append-only catalog: parts, compaction, newest-wins reads, the background appender (no Ray)."""

import os
import random
import threading
import time

import pyarrow.parquet as pq
import pytest

from meta import catalog
from meta.catalog import Part


def row(i: int, error: str = "e") -> dict:
    return {"sweep_id": f"s{i:05d}", "status": "failed", "error": error, "attempts": 1, "family": "cnn",
            "dataset": "mnist", "spec": "{}"}


def parts(*spans) -> list[Part]:
    return [Part(lo, hi, level, f"p{lo}-{hi}-{level}") for lo, hi, level in spans]


def test_a_merged_part_hides_its_inputs_and_levels_are_read_oldest_first():
    p = parts((1, 1, 0), (2, 2, 0), (1, 2, 1), (3, 3, 0), (0, 0, 2))
    assert [x.name for x in catalog.live(p)] == ["p0-0-2", "p1-2-1", "p3-3-0"]
    same_span = parts((5, 5, 0), (5, 5, 1))  # a merge of one part (never planned, but safe): the higher level wins
    assert [x.name for x in catalog.live(same_span)] == ["p5-5-1"]


def test_plan_merges_the_lowest_full_level_and_only_contiguous_parts():
    level0 = parts(*[(i, i, 0) for i in range(10, 14)])
    assert catalog.plan(level0, fan_in=4) == level0
    assert catalog.plan(level0[:3], fan_in=4) == []
    assert catalog.plan(level0[:3], fan_in=4, final=True) == level0[:3]  # a run's end merges its level 0
    assert catalog.plan(level0[:1], fan_in=4, final=True) == []
    full1 = parts(*[(i, i, 1) for i in range(4)]) + level0[:2]
    assert [x.level for x in catalog.plan(full1, fan_in=4)] == [1] * 4
    with pytest.raises(catalog.CatalogError, match="not contiguous"):  # a level-1 part newer than level-0 parts
        catalog.plan(parts((1, 1, 0), (2, 2, 1), (3, 3, 0), (4, 4, 0), (5, 5, 0)), fan_in=4)
    with pytest.raises(ValueError, match="fan_in"):
        catalog.plan(level0, fan_in=1)


def test_appends_read_back_newest_row_per_sweep_over_a_legacy_file(tmp_path):
    root = str(tmp_path)
    catalog.write(root, [row(i, "legacy") for i in range(6)])  # the single-file catalog of older versions
    for seq in range(1, 40):
        catalog.append(root, [row(seq % 10, f"v{seq}")], seq)
        catalog.compact(root, fan_in=4)
    got = {r["sweep_id"]: r["error"] for r in catalog.read(root)}
    want = {f"s{i:05d}": "legacy" for i in range(6)} | {f"s{s % 10:05d}": f"v{s}" for s in range(1, 40)}
    assert got == want
    levels = [p.level for p in catalog.live(catalog.list_parts(root))]
    assert len(levels) < 12 and max(levels) >= 2  # 39 commits folded into a few parts of three levels
    assert catalog.read_table(root, ["status"]).column_names == ["sweep_id", "status"]


def test_the_digest_depends_on_the_rows_not_on_how_they_are_laid_out(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rows = [row(i) for i in range(20)]
    catalog.write(a, rows)
    for i, r in enumerate(rows):
        catalog.append(b, [r], i + 1)
    catalog.compact(b, fan_in=3, final=True)
    assert catalog.digest(a) == catalog.digest(b)
    catalog.append(b, [row(3, "changed")], 100)
    assert catalog.digest(a) != catalog.digest(b)


def test_a_killed_merge_leaves_a_readable_catalog_and_its_leftovers_are_removed(tmp_path):
    root = str(tmp_path)
    for seq in range(1, 5):
        catalog.append(root, [row(seq)], seq)
    inputs = catalog.list_parts(root)
    merged = catalog.compact(root, fan_in=4, grace_s=0)
    assert merged > 0 and len(catalog.list_parts(root)) == 1
    for p in inputs:  # as if the merge was killed before deleting its inputs: they come back
        pq.write_table(catalog._table([row(p.lo, "stale")]), tmp_path / catalog.PARTS_DIR / p.name)
    assert {r["error"] for r in catalog.read(root)} == {"e"}  # the merged part hides them
    assert catalog.remove_merged_leftovers(root) == 4 and len(catalog.list_parts(root)) == 1


def test_a_merges_inputs_outlive_it_by_the_grace_period(tmp_path):
    root = str(tmp_path)
    for seq in range(1, 5):
        catalog.append(root, [row(seq)], seq)
    catalog.compact(root, fan_in=4)  # the default grace: a reader listing now may still need the inputs
    [merged] = catalog.live(catalog.list_parts(root))
    assert len(catalog.list_parts(root)) == 5 and catalog.remove_merged_leftovers(root, grace_s=30) == 0
    old = time.time() - 31
    os.utime(tmp_path / catalog.PARTS_DIR / merged.name, (old, old))
    assert catalog.remove_merged_leftovers(root, grace_s=30) == 4 and catalog.list_parts(root) == [merged]


def test_live_is_the_parts_no_other_part_covers():
    rng = random.Random(0)
    for _ in range(300):
        spans = [(lo, lo + rng.randrange(4), rng.randrange(3)) for lo in (rng.randrange(12) for _ in range(rng.randrange(1, 9)))]
        ps = parts(*spans)
        brute = sorted((p for p in ps if not any(q.covers(p) for q in ps)), key=lambda p: (p.hi, p.lo, p.name))
        assert catalog.live(ps) == brute, spans


def test_readers_never_miss_a_row_while_parts_are_merged(tmp_path):
    root, stop, seen, errors = str(tmp_path), threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                seen.append(len(catalog.read_table(root, ["status"])))
            except Exception as e:  # pragma: no cover - the failure this test is for
                errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for seq in range(1, 200):
            catalog.append(root, [row(seq)], seq)
            catalog.compact(root, fan_in=4)
    finally:
        stop.set()
        t.join()
    assert not errors and len(seen) > 20
    assert seen == sorted(seen)  # the row count only grows: no read saw a merge half done


def test_the_appender_batches_rows_off_the_callers_thread_and_commits_them_all(tmp_path):
    root = str(tmp_path)
    books = catalog.Appender(root, fan_in=4)
    t0 = time.perf_counter()
    for i in range(500):
        books.add([row(i)])
    queued_s = time.perf_counter() - t0
    books.close()
    assert len(catalog.read(root)) == 500
    assert books.commits < 500  # rows that queued while a commit was written went into one part
    assert queued_s < 0.5  # add() does not wait for the store
    assert len([p for p in catalog.list_parts(root) if p.level == 0]) <= 1  # the run's end merged level 0


def test_the_appender_keeps_rows_through_a_failing_store_and_raises_if_it_never_recovers(tmp_path, monkeypatch):
    root, calls = str(tmp_path), []
    real = catalog.append

    def flaky(r, rows, seq):
        calls.append(len(rows))
        if len(calls) <= 2:
            raise OSError("store unavailable")
        return real(r, rows, seq)

    monkeypatch.setattr(catalog, "append", flaky)
    books = catalog.Appender(root, retry_s=0.01)
    books.add([row(1), row(2)])
    books.close()
    assert sorted(r["sweep_id"] for r in catalog.read(root)) == ["s00001", "s00002"] and len(calls) == 3

    monkeypatch.setattr(catalog, "append", lambda *a: (_ for _ in ()).throw(OSError("store gone")))
    books = catalog.Appender(str(tmp_path / "other"), retry_s=0.01, tries=3)
    books.add([row(3)])
    with pytest.raises(catalog.CatalogError, match="1 catalog rows .* after 3 tries .store gone"):
        books.close()


def test_a_corrupt_part_is_an_error_naming_it(tmp_path):
    catalog.append(str(tmp_path), [row(1)], 1)
    [p] = catalog.list_parts(str(tmp_path))
    (tmp_path / catalog.PARTS_DIR / p.name).write_bytes(b"not parquet")
    with pytest.raises(catalog.CatalogError, match=p.name):
        catalog.read(str(tmp_path))


def test_a_part_merged_between_the_listing_and_its_read_is_read_from_the_merged_part(tmp_path, monkeypatch):
    root, real, merges = str(tmp_path), catalog._read_file, []
    for seq in range(1, 5):
        catalog.append(root, [row(seq)], seq)

    def merge_first(fs, path, columns):  # the listing is taken; a compaction deletes what it listed
        if not merges:
            merges.append(0)
            merges[0] = catalog.compact(root, fan_in=4)
        return real(fs, path, columns)

    monkeypatch.setattr(catalog, "_read_file", merge_first)
    assert sorted(r["sweep_id"] for r in catalog.read(root)) == [f"s{i:05d}" for i in range(1, 5)]
    assert merges[0] > 0
