"""The catalog: one row per sweep, the meta-dataset's index and the source of truth for resume.

A ``done`` row names the shard that holds the sweep, its sha256 and size; a ``failed`` row says why; a ``lost``
row says which damaged shard a resume found (its sweeps are run again). Every ``done`` row can be rebuilt from
its sample's JSON record (``done_row``).

Storage is an append-only table, so that keeping the books costs the same per sweep at any size (a whole-file
rewrite after every shard made them grow as N²):
- ``catalog/`` holds immutable parquet parts named ``<lo>-<hi>-L<level>-<id>.parquet``; ``lo..hi`` is the span
  of commit sequence numbers the part holds. A commit writes one level-0 part (``append``).
- A compaction (``compact``) merges every part of the lowest level that holds ``fan_in`` parts into one part
  of the next level. Its inputs are deleted only once it is ``GRACE_S`` old: a directory listing is not atomic,
  and one that missed a merged part being created and an input being deleted would miss rows (seen 3 times in 6
  runs of tests/test_catalog.py's race before). Levels stay ordered by age, so each row is rewritten O(log N)
  times and a reader opens at most ``fan_in`` parts per level.
- ``catalog.parquet``, the single file of older versions (and of ``write``), is the oldest layer and still reads.
Readers take the union, newest row per sweep id winning. A part whose span lies inside another's is a merge's
input not yet deleted (or left by a crash): its rows are in the merged part, so it is skipped. Rows name only
shards already published, so no state a reader can see names a shard that is not there.

Why parquet parts and not a table format such as Delta Lake: docs/scale.md has the
measurements; in short, no new dependency, and the same O(1) commit.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from meta import storage
from meta.record import LEGACY_PROTOCOL, SweepRecord, utc_now

if TYPE_CHECKING:  # meta.shards imports torch: the catalog's readers (meta.status) start in a second without it
    from meta.shards import ShardInfo

log = logging.getLogger(__name__)

FILENAME = "catalog.parquet"  # the single-file catalog: the oldest layer
PARTS_DIR = "catalog"
SHARDS_DIR = "shards"
FAN_IN = 16  # parts of one level merged into one of the next
GRACE_S = 30.0  # a merge's inputs outlive the merged part by this long: any listing shorter than it sees one of them

_f64, _i64, _str = pa.float64(), pa.int64(), pa.string()
SCHEMA = pa.schema(
    [
        ("sweep_id", _str),
        ("status", _str),  # done | failed | lost
        ("error", _str),
        ("attempts", _i64),
        ("shard", _str),  # file name under shards/
        ("shard_sha256", _str),
        ("shard_bytes", _i64),  # the shard's size, checked by every resume (null in catalogs before it existed)
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
        ("weight_decay", _f64),
        ("theta0", _str),
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
_PART = re.compile(r"^(\d{20})-(\d{20})-L(\d+)-([0-9a-f]{8})\.parquet$")


class CatalogError(storage.StorageError):
    """A catalog that cannot be read or written; the message names it."""


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
        "shard": shard.name, "shard_sha256": shard.sha256, "shard_bytes": shard.bytes, **_spec_columns(record.spec),
        "n_params": record.n_params,
        "stage_size": [s.subset_size for s in stages],
        "stage_train_loss": [s.train_loss for s in stages],
        "stage_train_acc": [s.train_acc for s in stages],
        "stage_test_acc": [s.test_acc for s in stages],
        "stage_wall_s": [s.wall_s for s in stages],
        # when the sweep ended, not when its shard was published: shards close in batches (status's rate reads it)
        "wall_s": record.wall_s, "finished_at": record.finished_at or utc_now(),
    }


def failed_row(sweep_id: str, spec: dict, error: str, attempts: int) -> dict:
    return {"sweep_id": sweep_id, "status": "failed", "error": error, "attempts": attempts,
            "shard": None, "shard_sha256": None, **_spec_columns(spec), "finished_at": utc_now()}


def lost_row(done: dict, why: str) -> dict:
    """A done row whose shard a resume found damaged or missing: the sweep is run again."""
    return {**done, "status": "lost", "error": why, "shard": None, "shard_sha256": None, "shard_bytes": None,
            "finished_at": utc_now()}


# --- the parts ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One immutable file of the catalog: the commits ``lo..hi`` at ``level`` (0: one commit)."""

    lo: int
    hi: int
    level: int
    name: str

    @classmethod
    def parse(cls, name: str) -> Part | None:
        m = _PART.match(name)
        return cls(int(m[1]), int(m[2]), int(m[3]), name) if m else None

    @classmethod
    def new(cls, lo: int, hi: int, level: int) -> Part:
        return cls(lo, hi, level, f"{lo:020d}-{hi:020d}-L{level}-{uuid.uuid4().hex[:8]}.parquet")

    def covers(self, other: Part) -> bool:
        """Holds every commit of ``other``: a merge of it (a wider span, or the same span a level up)."""
        inside = self.lo <= other.lo and other.hi <= self.hi
        return inside and ((self.lo, self.hi) != (other.lo, other.hi) or self.level > other.level)


def live(parts: Iterable[Part]) -> list[Part]:
    """The parts a reader reads, oldest first: those whose span no other part contains (a contained one is a
    merge's input, already in the merged part). One pass over the parts by start: a part is covered iff the one
    reaching furthest among those starting no later covers it."""
    alive, furthest = [], None
    for p in sorted(parts, key=lambda p: (p.lo, -p.hi, -p.level, p.name)):
        if furthest is None or not furthest.covers(p):
            alive.append(p)
        if furthest is None or p.hi > furthest.hi:
            furthest = p
    return sorted(alive, key=lambda p: (p.hi, p.lo, p.name))


def plan(parts: Iterable[Part], fan_in: int = FAN_IN, final: bool = False) -> list[Part]:
    """The parts to merge next (empty: none due): every live part of the lowest level holding ``fan_in`` of them;
    ``final`` (a run's end) merges level 0 from two parts on. A pure function, tested without files."""
    if fan_in < 2:
        raise ValueError(f"fan_in must be >= 2, got {fan_in}")
    alive = live(parts)
    for level in sorted({p.level for p in alive}):
        same = [p for p in alive if p.level == level]
        if len(same) >= fan_in or (final and level == 0 and len(same) >= 2):
            inside = [p for p in alive if same[0].hi <= p.hi <= same[-1].hi]
            if inside != same:  # levels are ordered by age; a part of another level among them would reorder rows
                raise CatalogError(f"catalog parts of level {level} are not contiguous: {[p.name for p in inside]}")
            return same
    return []


def _dirs(root: str):
    fs, path = storage.resolve(root)
    return fs, storage.join(path, FILENAME), storage.join(path, PARTS_DIR)


def list_parts(root: str) -> list[Part]:
    fs, _, parts_dir = _dirs(root)
    return [p for p in (Part.parse(i.base_name) for i in storage.list_files(fs, parts_dir, ".parquet")) if p]


def exists(root: str) -> bool:
    """Whether ``root`` holds a catalog (single file or parts)."""
    fs, base, _ = _dirs(root)
    return storage.exists(fs, base) or bool(list_parts(root))


def _read_file(fs, path: str, columns: list[str] | None) -> pa.Table:
    # One open, then parse in memory: pyarrow's read_table stats the path and opens it again, so a writer's rename
    # in between would hand it the new file with the old size (a torn read).
    with fs.open_input_file(path) as f:
        data = f.read()
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        present = set(pf.schema_arrow.names)
        table = pf.read(columns=[c for c in columns or SCHEMA.names if c in present])
    except pa.ArrowInvalid as e:  # parsed from memory, pyarrow's message names no file: name it
        raise CatalogError(f"{path} is not a readable catalog file ({e})") from e
    return _conform(table, columns)


def _conform(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """``table`` with ``columns`` (default all) of SCHEMA, in order: a column older files lack reads as null,
    the protocol columns as LEGACY_PROTOCOL."""
    names = columns or SCHEMA.names
    cols = []
    for name in names:
        field = SCHEMA.field(name)
        if name in table.column_names:
            cols.append(table.column(name).cast(field.type))
        else:
            fill = LEGACY_PROTOCOL.get(name)
            cols.append(pa.array([fill] * table.num_rows, type=field.type))
    return pa.Table.from_arrays(cols, schema=pa.schema([SCHEMA.field(n) for n in names]))


def _newest_per_sweep(table: pa.Table) -> pa.Table:
    """The last row of each sweep id (later files and rows are newer), sorted by sweep id; in pyarrow's kernels
    (100,000 rows: 0.1 s instead of 0.9 s row by row in Python)."""
    index = pa.table({"sweep_id": table["sweep_id"], "row": pa.array(np.arange(table.num_rows, dtype=np.int64))})
    last = index.group_by("sweep_id", use_threads=False).aggregate([("row", "max")])
    return table.take(pc.take(last["row_max"], pc.sort_indices(last["sweep_id"])))


def _read_live_parts(root: str, columns: list[str] | None, max_listings: int = 100) -> list[pa.Table]:
    """The live parts' tables, oldest first. A compaction may delete a part between our listing and our read; the
    part that merged it is then in the next listing: list again and read only what is new (parts never change)."""
    fs, _, parts_dir = _dirs(root)
    have: dict[str, pa.Table] = {}
    for _ in range(max_listings):
        alive = live(list_parts(root))
        try:
            for p in alive:
                if p.name not in have:
                    have[p.name] = _read_file(fs, storage.join(parts_dir, p.name), columns)
        except FileNotFoundError:
            continue
        return [have[p.name] for p in alive]
    raise CatalogError(f"{root}: the catalog's parts kept changing under {max_listings} listings in a row")


def read_table(root: str, columns: list[str] | None = None) -> pa.Table:
    """The catalog under ``root`` as one table (``columns`` only, sweep_id always), one row per sweep."""
    if columns is not None and "sweep_id" not in columns:
        columns = ["sweep_id", *columns]
    fs, base, _ = _dirs(root)
    tables = [_read_file(fs, base, columns)] if storage.exists(fs, base) else []
    tables += _read_live_parts(root, columns)
    if not tables:
        return _conform(SCHEMA.empty_table(), columns)
    return _newest_per_sweep(pa.concat_tables(tables))


def read(root: str) -> list[dict]:
    """All rows of the catalog under ``root``, one per sweep (empty if there is none yet)."""
    return read_table(root).to_pylist()


def _table(rows: Iterable[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in rows], schema=SCHEMA)


def _parquet(table: pa.Table, small: bool = False) -> bytes:
    """Parquet bytes without column statistics (nothing reads them); ``small`` (a commit's part, mostly footer)
    also leaves out the stored Arrow schema: 4.7 instead of 10.2 KB for one row (readers cast to SCHEMA)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, write_statistics=False, store_schema=not small)
    return sink.getvalue().to_pybytes()


def write(root: str, rows: Iterable[dict]) -> None:
    """Replace the whole catalog with ``rows`` (one per sweep id) as a single file: for tools and tests while
    no collection runs. A running collection appends (``Appender``)."""
    rows = sorted(rows, key=lambda r: r["sweep_id"])
    ids = [r["sweep_id"] for r in rows]
    if len(ids) != len(set(ids)):
        raise ValueError("catalog rows must have unique sweep ids")
    fs, base, parts_dir = _dirs(root)
    fs.create_dir(storage.resolve(root)[1], recursive=True)
    storage.write_atomic(fs, base, _parquet(_table(rows)))
    for p in list_parts(root):
        storage.delete_quietly(fs, storage.join(parts_dir, p.name))


def append(root: str, rows: list[dict], seq: int) -> int:
    """Commit ``rows`` as one new level-0 part numbered ``seq`` (the caller's, increasing); returns its bytes."""
    fs, _, parts_dir = _dirs(root)
    data = _parquet(_table(rows), small=True)
    fs.create_dir(parts_dir, recursive=True)
    storage.write_atomic(fs, storage.join(parts_dir, Part.new(seq, seq, 0).name), data)
    return len(data)


def compact(root: str, fan_in: int = FAN_IN, final: bool = False, grace_s: float = GRACE_S) -> int:
    """Merge what ``plan`` says is due, level by level, until nothing is; returns the bytes written. A merge's
    inputs stay until the merged part is ``grace_s`` old (``remove_merged_leftovers``): a directory listing is not
    atomic, and one that ran while the merged part appeared and an input vanished would miss that input's rows."""
    fs, _, parts_dir = _dirs(root)
    written = 0
    while merge := plan(list_parts(root), fan_in, final):
        table = _newest_per_sweep(pa.concat_tables([_read_file(fs, storage.join(parts_dir, p.name), None) for p in merge]))
        data = _parquet(table)
        storage.write_atomic(fs, storage.join(parts_dir, Part.new(merge[0].lo, merge[-1].hi, merge[0].level + 1).name), data)
        written += len(data)
        final = False  # the end of a run merges level 0 once; higher levels only when full
    remove_merged_leftovers(root, grace_s)
    return written


def remove_merged_leftovers(root: str, grace_s: float = 0.0) -> int:
    """Delete the parts that a merged part at least ``grace_s`` old holds (0: all of them, when no one reads)."""
    fs, _, parts_dir = _dirs(root)
    infos = {i.base_name: i for i in storage.list_files(fs, parts_dir, ".parquet")}
    parts = [p for p in map(Part.parse, infos) if p]
    alive = live(parts)
    his = [p.hi for p in alive]  # live spans are disjoint: the one holding a merged-away part is found by its end
    cutoff = time.time() - grace_s
    stale = []
    for p in set(parts) - set(alive):
        holder = alive[bisect.bisect_left(his, p.hi)]
        made = infos[holder.name].mtime  # None where a store keeps no times: then only grace_s = 0 deletes
        if grace_s <= 0 or (made is not None and made.timestamp() <= cutoff):
            stale.append(p)
    for p in stale:
        storage.delete_quietly(fs, storage.join(parts_dir, p.name))
    return len(stale)


def digest(root: str) -> str:
    """sha256 of the catalog's content (every row, by sweep id): the same table gives the same digest however
    its parts are laid out (lineage of what a KNOWN was trained on)."""
    h = hashlib.sha256()
    for row in read(root):
        h.update(json.dumps({k: v for k, v in row.items() if k != "finished_at"}, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


class Appender:
    """Commits catalog rows from a background thread, so a slow store never stalls the scheduler.

    ``add`` queues rows and returns at once; the thread commits whatever has queued as one part (under load,
    many rows a part) and compacts when a level fills. A failed commit keeps its rows and is tried again every
    ``retry_s``; ``close`` commits the rest, merges the run's level-0 parts, and raises ``CatalogError`` if rows
    are still uncommitted after ``tries`` failures in a row (the shards they name are published: the next run
    adopts them)."""

    def __init__(self, root: str, fan_in: int = FAN_IN, retry_s: float = 1.0, tries: int = 5):
        self.root, self.fan_in, self.retry_s, self.tries = root, fan_in, retry_s, tries
        self.bytes_written, self.commits = 0, 0
        self._seq = max([p.hi for p in list_parts(root)] + [0])
        self._pending: list[dict] = []
        self._closing, self._failures, self._last_error = False, 0, None
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="catalog-appender", daemon=True)
        self._thread.start()

    def add(self, rows: Iterable[dict]) -> None:
        with self._wake:
            self._pending.extend(rows)
            self._wake.notify()

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, time.time_ns())  # increasing, and after any earlier run's parts
        return self._seq

    def _loop(self) -> None:
        while rows := self._take():
            try:
                self.bytes_written += append(self.root, rows, self._next_seq())
                self.commits, self._failures = self.commits + 1, 0
            except Exception as e:  # the store failed: keep the rows, try again
                log.warning("catalog commit of %d rows failed (%s); retrying in %gs", len(rows), e, self.retry_s)
                with self._wake:
                    self._pending[:0] = rows
                    self._failures, self._last_error = self._failures + 1, e
                time.sleep(self.retry_s)
                continue
            try:
                self.bytes_written += compact(self.root, self.fan_in)
            except Exception as e:  # the rows are committed; merging waits for the next commit
                log.warning("catalog compaction failed (%s); will try again", e)

    def _take(self) -> list[dict]:
        """The rows queued so far (waits for some); empty once closing with nothing left, or given up."""
        with self._wake:
            while not self._pending and not self._closing:
                self._wake.wait()
            if self._closing and self._failures >= self.tries:
                return []
            rows, self._pending = self._pending, []
            return rows

    def close(self) -> None:
        """Commit every queued row and merge this run's parts (see the class)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        if self._pending:
            raise CatalogError(f"{len(self._pending)} catalog rows of {self.root} could not be committed after "
                               f"{self._failures} tries ({self._last_error}); published shards are adopted by the next run")
        self.bytes_written += compact(self.root, self.fan_in, final=True)
