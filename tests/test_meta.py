import io
import json
import tarfile

import numpy as np
import pytest
import torch

from meta import catalog, readers, storage
from meta.shards import FORMAT_VERSION, ShardError, ShardWriter, decode_sample, encode_sample, iter_shard


def _sample(key: str, n_stages: int = 3, numel: int = 1000) -> dict:
    tensors = {"w": torch.randn(n_stages, numel), "n": torch.arange(n_stages, dtype=torch.int64)}
    record = {
        "format": FORMAT_VERSION, "sweep_id": key, "n_stages": n_stages, "spec": {"family": "cnn", "dataset": "mnist"},
        "n_params": numel, "wall_s": 1.0, "versions": {"torch": torch.__version__},
        "stages": [{"stage": k, "subset_size": 100 >> k, "steps": 4, "train_loss": 1.0, "train_acc": 0.5,
                    "test_loss": 1.0, "test_acc": 0.5, "wall_s": 0.1} for k in range(n_stages)],
        "tensors": [{"name": "w", "shape": [numel], "dtype": "float32", "kind": "linear"},
                    {"name": "n", "shape": [], "dtype": "int64", "kind": "buffer"}],
    }
    return encode_sample(record, tensors)


def test_writer_rotates_by_size_publishes_atomically_and_hashes(tmp_path):
    d = tmp_path / "shards"
    with ShardWriter(str(d), "w0", max_bytes=10_000) as w:
        published = []
        for i in range(5):
            published += w.write(_sample(f"s{i}", numel=1000))  # ~12 kB each: one shard per sample
            hidden = [p.name for p in d.iterdir() if p.name.startswith(".")]
            assert len(hidden) == 0  # each sample filled a shard, which was published at once
        assert len(published) == 5
    with ShardWriter(str(d), "w1", max_bytes=10**9) as w:
        assert w.write(_sample("a")) == [] and w.write(_sample("b")) == []
        assert [p.name for p in d.glob("w1*")] == []  # open shard: invisible under its final name
    assert [s.name for s in w.published] == ["w1-00000.tar"] and w.published[0].keys == ["a", "b"]
    import hashlib

    for info in published + w.published:
        assert hashlib.sha256((d / info.name).read_bytes()).hexdigest() == info.sha256
        assert (d / info.name).stat().st_size == info.bytes
    got = [s.key for s in iter_shard(str(d / "w1-00000.tar"), sha256=w.published[0].sha256)]
    assert got == ["a", "b"]


def test_writer_discards_the_open_shard_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path), "w0") as w:
            w.write(_sample("a"))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw, named", [({"prefix": "../x"}, "'../x'"), ({"prefix": "ok", "max_bytes": 0}, "max_bytes"),
                                       ({"prefix": "ok", "max_seconds": -1}, "max_seconds")])
def test_writer_validates_arguments(tmp_path, kw, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        ShardWriter(str(tmp_path), **kw)


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_hostile_and_corrupt_shards_are_rejected_naming_the_shard(tmp_path):
    good = _sample("k")
    cases = {
        "pickle.tar": {"k.json": good["json"], "k.safetensors": good["safetensors"], "k.pickle": b"cos\nsystem\n"},
        "pt.tar": {"k.json": good["json"], "k.pt": b"\x80\x02"},
        "traversal.tar": {"../evil.json": good["json"]},
        "badjson.tar": {"k.json": json.dumps({"sweep_id": 5}).encode(), "k.safetensors": good["safetensors"]},
        "badtensors.tar": {"k.json": good["json"], "k.safetensors": b"not safetensors"},
    }
    for name, members in cases.items():
        (tmp_path / name).write_bytes(_tar(members))
        with pytest.raises(ShardError, match=name):
            list(iter_shard(str(tmp_path / name)))
    whole = _tar({"k.json": good["json"], "k.safetensors": good["safetensors"]})
    (tmp_path / "trunc.tar").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ShardError, match="trunc.tar"):
        list(iter_shard(str(tmp_path / "trunc.tar")))
    (tmp_path / "ok.tar").write_bytes(whole)
    with pytest.raises(ShardError, match="sha256"):
        list(iter_shard(str(tmp_path / "ok.tar"), sha256="0" * 64))


def test_decode_round_trip_keeps_values_and_dtypes():
    s = decode_sample(_sample("k", numel=7))
    assert s.tensors["w"].shape == (3, 7) and s.tensors["n"].dtype == np.int64


def test_catalog_round_trip_and_unique_ids(tmp_path):
    spec = {"family": "cnn", "arch": {"depth": 2}, "dataset": "mnist", "r": 0.5, "lr": 1e-3, "batch_size": 32,
            "optimizer": "adam", "pretrain_epochs": 1, "n_stages": 3, "stage_epochs": 1, "train_size": None,
            "test_size": None, "seed": 1}
    rows = [catalog.failed_row("b", spec, "worker died", 3), catalog.failed_row("a", spec, "x", 1)]
    catalog.write(str(tmp_path), rows)
    got = catalog.read(str(tmp_path))
    assert [r["sweep_id"] for r in got] == ["a", "b"] and got[1]["attempts"] == 3 and got[1]["family"] == "cnn"
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "catalog.parquet").schema.equals(catalog.SCHEMA)
    with pytest.raises(ValueError, match="unique"):
        catalog.write(str(tmp_path), rows + rows)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_catalog_reads_whole_while_a_writer_replaces_it(tmp_path):
    """A reader polling the catalog during a collection (the CLI's status, the failure suite) never sees a torn file:
    before reads were one open, about a quarter of these reads failed with "Couldn't deserialize thrift"."""
    import threading
    import time

    spec = {"family": "cnn", "arch": {"depth": 2}, "dataset": "mnist", "r": 0.5, "lr": 1e-3, "batch_size": 32,
            "optimizer": "adam", "pretrain_epochs": 1, "n_stages": 3, "stage_epochs": 1, "train_size": None,
            "test_size": None, "seed": 1}
    catalog.write(str(tmp_path), [catalog.failed_row("a", spec, "x", 1)])
    stop = threading.Event()

    def rewrite():  # catalogs of changing sizes, so a stale size points into the wrong bytes
        i = 0
        while not stop.is_set():
            i += 1
            catalog.write(str(tmp_path), [catalog.failed_row(f"s{j}", spec, "e" * (i % 50), 1) for j in range(1 + i % 20)])

    writer = threading.Thread(target=rewrite)
    writer.start()
    reads, end, cap = 0, time.monotonic() + 2.0, time.monotonic() + 60.0  # 2 s and 100 reads, a loaded machine longer
    try:
        while (time.monotonic() < end or reads <= 100) and time.monotonic() < cap:
            assert catalog.read(str(tmp_path))
            reads += 1
    finally:
        stop.set()
        writer.join()
    assert reads > 100


def test_storage_rejects_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(storage.StorageError, match=str(blocker)):
        storage.check_writable(str(blocker / "out"))


def test_readers_read_only_what_the_catalog_lists(tmp_path):
    """A shard the catalog does not name (left by a crash) is not read; a missing sample is an error."""
    d = tmp_path / "shards"
    with ShardWriter(str(d), "w0") as w:
        for k in ("a", "b"):
            w.write(_sample(k))
    with ShardWriter(str(d), "w1") as w2:
        w2.write(_sample("a"))  # an orphan duplicate of "a"
    info = w.published[0]
    spec = {"family": "cnn", "dataset": "mnist"}
    rows = [{**catalog.failed_row(k, spec, None, 1), "status": "done", "error": None, "shard": info.name,
             "shard_sha256": info.sha256} for k in ("a", "b")]
    catalog.write(str(tmp_path), rows)
    assert [s.key for s in readers.iter_sweeps(str(tmp_path))] == ["a", "b"]
    assert [s.key for s in readers.iter_sweeps(str(tmp_path), where=lambda r: r["sweep_id"] == "b")] == ["b"]
    catalog.write(str(tmp_path), rows + [{**rows[0], "sweep_id": "c"}])
    with pytest.raises(ShardError, match=r"lacks sweeps .*'c'"):
        list(readers.iter_sweeps(str(tmp_path)))


def test_compressed_and_duplicate_member_shards_are_shard_errors(tmp_path):
    import gzip

    good = _sample("k")
    whole = _tar({"k.json": good["json"], "k.safetensors": good["safetensors"]})
    (tmp_path / "z.tar").write_bytes(gzip.compress(whole))
    with pytest.raises(ShardError, match="compressed"):
        list(iter_shard(str(tmp_path / "z.tar")))
    with tarfile.open(tmp_path / "dup.tar", "w") as t:  # the same member twice in one sample
        for name, blob in (("k.json", good["json"]), ("k.json", good["json"]), ("k.safetensors", good["safetensors"])):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    with pytest.raises(ShardError, match=r"dup\.tar: .*duplicate"):
        list(iter_shard(str(tmp_path / "dup.tar")))


def test_storage_join_keeps_a_uri_query_at_the_end():
    assert storage.join("s3://b/p?endpoint_override=h:9000", "shards") == "s3://b/p/shards?endpoint_override=h:9000"
    assert storage.uri_like("s3://b/p?scheme=http", "b/p/shards/x.tar") == "s3://b/p/shards/x.tar?scheme=http"
    assert storage.join("/a/b", "c", "d") == "/a/b/c/d"
