"""The catalog: one parquet row per sweep, the meta-dataset's index and the source of truth for resume.

A ``done`` row names the shard that holds the sweep and that shard's sha256; a ``failed`` row says why.
The file is rewritten atomically, after the shards it names are published, so it never points at a shard
that is not there. Every ``done`` row can be rebuilt from its sample's JSON record (``done_row``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from meta import storage
from meta.record import LEGACY_PROTOCOL, SweepRecord
from meta.shards import ShardInfo

FILENAME = "catalog.parquet"
SHARDS_DIR = "shards"

_f64, _i64, _str = pa.float64(), pa.int64(), pa.string()
SCHEMA = pa.schema(
    [
        ("sweep_id", _str),
        ("status", _str),  # done | failed
        ("error", _str),
        ("attempts", _i64),
        ("shard", _str),  # file name under shards/
        ("shard_sha256", _str),
        ("family", _str),
        ("arch", _str),  # JSON of the sampled size
        ("dataset", _str),
        ("r", _f64),
        ("lr", _f64),
        ("batch_size", _i64),
        ("optimizer", _str),
        ("pretrain_epochs", _i64),
        ("n_stages", _i64),
        ("stage_epochs", _i64),
        ("train_size", _i64),
        ("test_size", _i64),
        ("seed", _i64),
        ("stage_init", _str),  # the forgetting protocol (meta.record.LEGACY_PROTOCOL: the values before
        ("schedule", _str),  # these columns existed, which a catalog without them reads as)
        ("optimizer_state", _str),
        ("augment", _str),
        ("n_params", _i64),
        ("stage_size", pa.list_(_i64)),
        ("stage_train_loss", pa.list_(_f64)),
        ("stage_train_acc", pa.list_(_f64)),
        ("stage_test_acc", pa.list_(_f64)),
        ("stage_wall_s", pa.list_(_f64)),
        ("wall_s", _f64),
        ("finished_at", _str),
        ("spec", _str),  # the whole spec as JSON: enough to run the sweep again
    ]
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _spec_columns(spec: dict) -> dict:
    cols = {k: spec.get(k) for k in ("family", "dataset", "r", "lr", "batch_size", "optimizer", "pretrain_epochs",
                                     "n_stages", "stage_epochs", "train_size", "test_size", "seed")}
    cols |= {k: spec.get(k, v) for k, v in LEGACY_PROTOCOL.items()}
    return {**cols, "arch": json.dumps(spec.get("arch"), sort_keys=True), "spec": json.dumps(spec, sort_keys=True)}


def done_row(record: SweepRecord | dict, shard: ShardInfo, attempts: int = 1) -> dict:
    """The catalog row of a sweep published in ``shard`` (a worker's record arrives as a plain dict)."""
    record = SweepRecord.model_validate(record)
    stages = record.stages
    return {
        "sweep_id": record.sweep_id, "status": "done", "error": None, "attempts": attempts,
        "shard": shard.name, "shard_sha256": shard.sha256, **_spec_columns(record.spec),
        "n_params": record.n_params,
        "stage_size": [s.subset_size for s in stages],
        "stage_train_loss": [s.train_loss for s in stages],
        "stage_train_acc": [s.train_acc for s in stages],
        "stage_test_acc": [s.test_acc for s in stages],
        "stage_wall_s": [s.wall_s for s in stages],
        "wall_s": record.wall_s, "finished_at": _now(),
    }


def failed_row(sweep_id: str, spec: dict, error: str, attempts: int) -> dict:
    return {"sweep_id": sweep_id, "status": "failed", "error": error, "attempts": attempts,
            "shard": None, "shard_sha256": None, **_spec_columns(spec), "finished_at": _now()}


def read(root: str) -> list[dict]:
    """All rows of the catalog under ``root`` (empty if there is none yet)."""
    fs, path = storage.resolve(root)
    p = storage.join(path, FILENAME)
    if not storage.exists(fs, p):
        return []
    # One open, then parse in memory: pyarrow's read_table stats the path and opens it again, so a writer's rename in
    # between hands it the new file with the old size (a torn read: "Couldn't deserialize thrift").
    with fs.open_input_file(p) as f:
        data = f.read()
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowInvalid as e:  # parsed from memory, pyarrow's message names no file: name it
        raise storage.StorageError(f"{root}: {FILENAME} is not a readable catalog ({e})") from e
    return [{**LEGACY_PROTOCOL, **row} if "stage_init" not in row else row for row in table.to_pylist()]


def write(root: str, rows: Iterable[dict]) -> None:
    """Replace the catalog with ``rows`` (one per sweep id, sorted), atomically."""
    rows = sorted(rows, key=lambda r: r["sweep_id"])
    ids = [r["sweep_id"] for r in rows]
    if len(ids) != len(set(ids)):
        raise ValueError("catalog rows must have unique sweep ids")
    table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    fs, path = storage.resolve(root)
    storage.write_atomic(fs, storage.join(path, FILENAME), sink.getvalue().to_pybytes())
