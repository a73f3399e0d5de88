"""Readers over a collected meta-dataset: a plain iterator and a Ray Data dataset.

Both read only what the catalog lists as ``done`` (the catalog is the index), so a shard left by a
crashed run, or a sample superseded by a re-run, is never read twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

from meta import catalog, storage
from meta.shards import Sample, ShardError, decode_sample, iter_shard

Where = Callable[[dict], bool]


def _selected(root: str, where: Where | None) -> dict[str, dict[str, dict]]:
    """shard name -> {sweep_id: catalog row} for the done rows that ``where`` keeps."""
    by_shard: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in catalog.read(root):
        if row["status"] == "done" and (where is None or where(row)):
            by_shard[row["shard"]][row["sweep_id"]] = row
    return dict(sorted(by_shard.items()))


def iter_sweeps(root: str, where: Where | None = None, *, verify: bool = True) -> Iterator[Sample]:
    """Every selected sweep as a ``Sample`` (record + numpy tensors [L, *shape]), shard by shard.

    ``where`` filters catalog rows (e.g. ``lambda r: r["family"] == "cnn"``); with ``verify`` each shard's
    bytes are checked against the sha256 in the catalog. A sweep the catalog promises but its shard lacks
    is an error naming both.
    """
    _, path = storage.resolve(root)
    for shard, rows in _selected(root, where).items():
        sha = next(iter(rows.values()))["shard_sha256"] if verify else None
        seen = set()
        for sample in iter_shard(storage.uri_like(root, storage.join(path, catalog.SHARDS_DIR, shard)), sha256=sha):
            if sample.key in rows and sample.key not in seen:
                seen.add(sample.key)
                yield sample
        if seen != set(rows):
            raise ShardError(f"shard {shard} lacks sweeps the catalog lists: {sorted(set(rows) - seen)}")


def _ray_decoder(raw: dict) -> dict:
    """Ray Data decoder: validates a sample without unpickling anything; keeps tensors as safetensors bytes.

    Rows stay flat (key, record JSON, tensor bytes) because sweeps differ in tensor names and shapes;
    ``meta.shards.decode_sample`` turns a row back into a ``Sample`` where it is consumed.
    """
    sample = decode_sample(raw, raw.get("__url__", "?"))
    return {"sweep_id": sample.key, "json": raw["json"], "safetensors": raw["safetensors"]}


def ray_dataset(root: str, where: Where | None = None, **read_args):
    """A ``ray.data.Dataset`` of the selected sweeps (columns: sweep_id, json, safetensors)."""
    import ray.data

    selected = _selected(root, where)
    if not selected:
        raise ValueError(f"no done sweeps under {root} match the selection")
    keep = {sid for rows in selected.values() for sid in rows}
    fs, path = storage.resolve(root)
    # paths inside ``fs`` (no scheme, no URI query: with an explicit filesystem Ray would keep the query in the name)
    paths = [storage.join(path, catalog.SHARDS_DIR, s) for s in selected]
    ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=_ray_decoder, **read_args)
    return ds.filter(lambda row: row["sweep_id"] in keep)


def row_to_sample(row: dict) -> Sample:
    """A Ray Data row back to a ``Sample``."""
    return decode_sample({"__key__": row["sweep_id"], "json": row["json"], "safetensors": row["safetensors"]})
