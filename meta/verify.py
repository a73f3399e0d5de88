"""Is every catalogued shard intact? A cheap check for every resume, a full one on request.

``check`` compares one listing of ``shards/`` with the sizes the catalog recorded (O(1) per shard, no shard
read): what a resume runs, so a truncated or missing shard is redone instead of skipped. ``verify`` hashes
every shard against its recorded sha256 (``python -m meta.status OUT --verify``). A damaged shard is moved
aside to ``damaged/`` by ``set_aside``, never deleted: whatever can be recovered from it stays.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from meta import catalog, storage

DAMAGED_DIR = "damaged"
COLUMNS = ["status", "shard", "shard_bytes", "shard_sha256"]  # the catalog columns these checks read


class DamagedShardError(storage.StorageError):
    """A catalogued shard is missing or damaged; the message names it and the fix."""


@dataclass(frozen=True)
class Damage:
    shard: str  # file name under shards/
    why: str
    sweeps: tuple[str, ...] = field(default=())


def _catalogued(table: pa.Table) -> dict[str, tuple[list[str], int | None, str | None]]:
    """shard -> (its done sweeps, recorded bytes, recorded sha256), from the catalog's columns."""
    out: dict = defaultdict(lambda: ([], None, None))
    cols = table.select(["sweep_id", "status", "shard", "shard_bytes", "shard_sha256"]).to_pydict()
    for sid, status, shard, size, sha in zip(*cols.values()):
        if status == "done":
            ids = out[shard][0]
            ids.append(sid)
            out[shard] = (ids, size, sha)
    return dict(out)


def check(root: str, table: pa.Table) -> list[Damage]:
    """Catalogued shards that are missing or whose size is not the recorded one (rows without a recorded size,
    from older catalogs, are checked for presence only)."""
    fs, path = storage.resolve(root)
    sizes = {i.base_name: i.size for i in storage.list_files(fs, storage.join(path, catalog.SHARDS_DIR), ".tar")}
    damaged = []
    for shard, (ids, size, _) in sorted(_catalogued(table).items()):
        if shard not in sizes:
            damaged.append(Damage(shard, "missing", tuple(ids)))
        elif size is not None and sizes[shard] != size:
            damaged.append(Damage(shard, f"{sizes[shard]:,} bytes, the catalog says {size:,}", tuple(ids)))
    return damaged


def require_intact(root: str, table: pa.Table) -> None:
    """``check``, as the readers' pre-flight: raises naming the first damaged shard (one line, no traceback)."""
    damaged = check(root, table)
    if damaged:
        d = damaged[0]
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise DamagedShardError(f"shard {d.shard} of {root} is {d.why}{more}: rerun the collection's command to move it "
                                f"aside and redo its {len(d.sweeps)} sweeps")


def verify(root: str, table: pa.Table, on_shard: Callable[[int], None] | None = None) -> list[Damage]:
    """``check``, then the sha256 of every shard that passed it; ``on_shard(bytes)`` after each (a progress bar)."""
    fs, path = storage.resolve(root)
    damaged = check(root, table)
    bad = {d.shard for d in damaged}
    for shard, (ids, size, sha) in sorted(_catalogued(table).items()):
        if shard in bad:
            continue
        got = storage.sha256(fs, storage.join(path, catalog.SHARDS_DIR, shard))
        if got != sha:
            damaged.append(Damage(shard, f"sha256 {got[:12]}…, the catalog says {(sha or '?')[:12]}…", tuple(ids)))
        if on_shard:
            on_shard(size or 0)
    return sorted(damaged, key=lambda d: d.shard)


def set_aside(root: str, shard: str) -> str | None:
    """Move a damaged shard to ``damaged/`` (a later one of the same name gets a suffix); its new name, or None
    when it was missing."""
    fs, path = storage.resolve(root)
    src = storage.join(path, catalog.SHARDS_DIR, shard)
    if not storage.exists(fs, src):
        return None
    fs.create_dir(storage.join(path, DAMAGED_DIR), recursive=True)
    name, n = shard, 1
    while storage.exists(fs, storage.join(path, DAMAGED_DIR, name)):
        name, n = f"{shard}.{n}", n + 1
    fs.move(src, storage.join(path, DAMAGED_DIR, name))
    return f"{DAMAGED_DIR}/{name}"
