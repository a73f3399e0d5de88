"""Webdataset shards of sweeps: the sample format, a size-rotating atomic writer, and a strict reader.

A sample is one sweep: ``<sweep_id>.json`` (the record: spec, per-stage metrics, tensor names/shapes/kinds,
versions) followed by ``<sweep_id>.safetensors`` (every state-dict entry stacked over stages, [L, *shape]).
Only those two members are ever accepted: no pickle, no ``.pt``, nothing executable.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pydantic import ValidationError

from meta import storage
from meta.errors import OblivionError
from meta.record import FORMAT_VERSION, SweepRecord
MEMBERS = ("json", "safetensors")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ShardError(OblivionError, ValueError):
    """A shard or sample that is corrupt, truncated or not ours; the message names the shard."""


@dataclass
class Sample:
    key: str
    record: SweepRecord
    tensors: dict[str, np.ndarray]


@dataclass
class ShardInfo:
    """A published shard: what the catalog records so that readers can verify it."""

    name: str
    path: str
    sha256: str
    bytes: int
    keys: list[str] = field(default_factory=list)


def encode_sample(record: dict, tensors: dict[str, torch.Tensor]) -> dict:
    key = record.get("sweep_id", "")
    if not _SAFE_NAME.match(key):
        raise ShardError(f"sample key {key!r} is not a plain identifier")
    blob = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
    return {"__key__": key, "json": json.dumps(record, sort_keys=True).encode(), "safetensors": blob}


def decode_sample(raw: dict, shard: str = "?") -> Sample:
    """Validate and decode one raw sample ({'__key__', 'json', 'safetensors'}); never unpickles."""
    key = raw.get("__key__")
    extra = sorted(k for k in raw if not k.startswith("__") and k not in MEMBERS)
    if extra:
        raise ShardError(f"shard {shard}: sample {key!r} has members {extra}; only {list(MEMBERS)} are allowed")
    missing = [m for m in MEMBERS if m not in raw]
    if missing:
        raise ShardError(f"shard {shard}: sample {key!r} lacks {missing}")
    try:
        record = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"shard {shard}: sample {key!r} has an unreadable JSON record: {e}") from e
    if not isinstance(record, dict) or record.get("sweep_id") != key or record.get("format") != FORMAT_VERSION:
        raise ShardError(f"shard {shard}: sample {key!r} has a record that is not a format-{FORMAT_VERSION} sweep record")
    try:
        record = SweepRecord.model_validate(record)
    except ValidationError as e:
        first = e.errors()[0]
        raise ShardError(f"shard {shard}: sample {key!r}: record field {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    try:
        tensors = safetensors.numpy.load(bytes(raw["safetensors"]))
    except Exception as e:  # safetensors raises its own error type on garbage
        raise ShardError(f"shard {shard}: sample {key!r} has unreadable tensors: {e}") from e
    if {m.name for m in record.tensors} != set(tensors):
        raise ShardError(f"shard {shard}: sample {key!r}: tensor list in the record does not match the tensors")
    for m in record.tensors:
        if list(tensors[m.name].shape) != [record.n_stages, *m.shape]:
            raise ShardError(f"shard {shard}: sample {key!r}: tensor {m.name} has shape {tensors[m.name].shape}")
    return Sample(key, record, tensors)


class _HashingStream:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, sink):
        self.sink, self.sha, self.bytes = sink, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.sink.write(b)

    def flush(self) -> None:
        self.sink.flush()


class ShardWriter:
    """Writes samples into ``<prefix>-00000.tar``, ``<prefix>-00001.tar``, … under ``directory``.

    A shard is written under a hidden temporary name and moved into place only when complete, once it holds
    ``max_bytes`` or is ``max_seconds`` old (checked after each sample), or on ``close``. ``write`` and
    ``close`` return the shards they published, with their sha256, so the caller can record them (the
    catalog is the index, written after the shards). Leaving the ``with`` block through an exception
    discards the open shard: a half-written shard is never visible.
    """

    def __init__(self, directory: str, prefix: str, max_bytes: int = 256 * 2**20, max_seconds: float | None = None):
        if not isinstance(prefix, str) or not _SAFE_NAME.match(prefix):
            raise ValueError(f"prefix {prefix!r} must be letters, digits, '_' or '-' (it names files)")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        if max_seconds is not None and max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0 or None, got {max_seconds!r}")
        self.fs, self.dir = storage.resolve(directory)
        self.fs.create_dir(self.dir, recursive=True)
        self.prefix, self.max_bytes, self.max_seconds = prefix, max_bytes, max_seconds
        self.published: list[ShardInfo] = []
        self._seq = 0
        self._open = None  # (name, tmp path, native stream, hashing stream, tar writer, keys, opened at)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, sample: dict) -> list[ShardInfo]:
        if self._open is None:
            name = f"{self.prefix}-{self._seq:05d}.tar"
            self._seq += 1
            path = storage.join(self.dir, name)
            tmp = storage.tmp_name(path)
            native = self.fs.open_output_stream(tmp)
            stream = _HashingStream(native)
            self._open = [name, tmp, native, stream, wds.TarWriter(stream, encoder=False, mtime=0.0), [], time.monotonic()]
        name, tmp, native, stream, tar, keys, opened = self._open
        if sample["__key__"] in keys:
            raise ShardError(f"sample {sample['__key__']!r} written twice to shard {name}")
        tar.write(sample)
        keys.append(sample["__key__"])
        too_old = self.max_seconds is not None and time.monotonic() - opened >= self.max_seconds
        return [self._publish()] if stream.bytes >= self.max_bytes or too_old else []

    def close(self) -> list[ShardInfo]:
        return [self._publish()] if self._open is not None else []

    def abort(self) -> None:
        if self._open is not None:
            _, tmp, native, _, tar, *_ = self._open
            self._open = None
            try:
                tar.close()  # finish the tar stream so nothing flushes into a closed file later
                native.close()
            finally:
                storage.delete_quietly(self.fs, tmp)

    def _publish(self) -> ShardInfo:
        name, tmp, native, stream, tar, keys, _ = self._open
        self._open = None
        try:
            tar.close()  # writes the end-of-archive blocks through the hashing stream
            native.close()
            path = storage.join(self.dir, name)
            self.fs.move(tmp, path)
        except BaseException:
            storage.delete_quietly(self.fs, tmp)
            raise
        info = ShardInfo(name, path, stream.sha.hexdigest(), stream.bytes, list(keys))
        self.published.append(info)
        return info


def iter_shard(path: str, *, sha256: str | None = None) -> Iterator[Sample]:
    """Decoded samples of one shard (local path or URI). With ``sha256``, the bytes are verified first."""
    fs, p = storage.resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            blob = f.read()
    except (OSError, FileNotFoundError) as e:
        raise ShardError(f"shard {path} cannot be read: {e}") from e
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise ShardError(f"shard {path} does not match its recorded sha256 (corrupt or replaced)")
    yield from _samples(blob, path)


def _samples(blob: bytes, path: str) -> Iterator[Sample]:
    if blob[:2] == b"\x1f\x8b" or blob[:6] == b"\xfd7zXZ\x00" or blob[:3] == b"BZh":
        raise ShardError(f"shard {path} is compressed; shards are plain tar files (no decompression bombs)")
    def names_checked():
        try:
            for member in tar_file_iterator(io.BytesIO(blob)):
                fname = member["fname"]
                base = fname.split(".", 1)[0]
                if "/" in fname or ".." in fname or not _SAFE_NAME.match(base):
                    raise ShardError(f"shard {path}: member name {fname!r} is not allowed")
                yield {**member, "__url__": path}
        except tarfile.TarError as e:
            raise ShardError(f"shard {path} is truncated or not a tar file: {e}") from e

    try:
        for raw in group_by_keys(names_checked()):
            yield decode_sample(raw, path)
    except ValueError as e:  # webdataset: duplicate member names in one sample
        if isinstance(e, ShardError):
            raise
        raise ShardError(f"shard {path}: {e}") from e
