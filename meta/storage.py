"""One code path for local folders and object storage (``s3://…``): pyarrow filesystems.

Every write that others may read is atomic: written under a hidden temporary name in the same folder, then
moved into place (a rename on a local disk; on object stores the object appears whole when its upload ends).
"""

from __future__ import annotations

import hashlib
import posixpath
import uuid
from pathlib import Path

from pyarrow import fs as pafs

from meta.errors import OblivionError


class StorageError(OblivionError, OSError):
    """An output location that cannot be used; the message names it."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as ``s3://bucket/prefix``."""
    if "://" in str(uri):
        try:
            return pafs.FileSystem.from_uri(str(uri))
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants
            raise StorageError(f"cannot open {uri}: {e}") from e
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """``base``/``parts``; a URI's query (``s3://b/p?endpoint_override=…``) stays at the end."""
    path, sep, query = base.partition("?")
    return posixpath.join(path, *parts) + sep + query


def normalize(uri: str) -> str:
    """URIs unchanged; local paths absolute (workers may run in another folder)."""
    return str(uri) if "://" in str(uri) else str(Path(uri).expanduser().resolve())


def uri_like(root: str, path: str) -> str:
    """``path`` from ``resolve(root)[0]`` as a URI of the same kind as ``root`` (scheme and query kept)."""
    if "://" not in root:
        return path
    _, sep, query = root.partition("?")
    return f"{root.split('://')[0]}://{path}{sep}{query}"


def sha256(fs: pafs.FileSystem, path: str, chunk: int = 2**22) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tmp_name(path: str) -> str:
    """A hidden sibling of ``path``; readers that list ``*.tar`` or the catalog never see it."""
    d, name = posixpath.split(path)
    return posixpath.join(d, f".{name}.tmp-{uuid.uuid4().hex[:8]}")


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    tmp = tmp_name(path)
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        delete_quietly(fs, tmp)
        raise


def delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, directory: str, suffix: str = "") -> list[pafs.FileInfo]:
    """Files directly in ``directory`` whose name ends with ``suffix`` (hidden temporaries excluded)."""
    if not exists(fs, directory):
        return []
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=False))
    return sorted(
        (i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and not i.base_name.startswith(".")),
        key=lambda i: i.path,
    )


def remove_stale_temporaries(fs: pafs.FileSystem, directory: str) -> int:
    """Delete temporaries a crashed writer left behind (only safe while no writer uses ``directory``)."""
    if not exists(fs, directory):
        return 0
    stale = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(directory, recursive=False))
        if i.type == pafs.FileType.File and i.base_name.startswith(".") and ".tmp-" in i.base_name
    ]
    for p in stale:
        delete_quietly(fs, p)
    return len(stale)


def _probe(fs: pafs.FileSystem, directory: str) -> None:
    """Write and delete a hidden file in ``directory``: the only proof of writability that holds for root too."""
    probe = join(directory, f".probe-{uuid.uuid4().hex[:8]}")
    with fs.open_output_stream(probe) as f:
        f.write(b"ok")
    fs.delete_file(probe)


def check_writable(uri: str) -> None:
    """Create ``uri`` if needed and prove a file can be written there, before any expensive work."""
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
        _probe(fs, path)
    except Exception as e:
        raise StorageError(f"output {uri} is not writable: {e}") from e


def check_output(uri: str, folder: bool, flag: str) -> None:
    """Refuse an output before any work, creating nothing: a folder where a file is needed or the reverse, a
    parent that is a file, or one that cannot be written to. ``flag`` names it in the message."""
    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory and not folder:
        raise StorageError(f"{flag} {uri} is a folder: give the name of a file to write")
    if kind == pafs.FileType.File and folder:
        raise StorageError(f"{flag} {uri} is a file: give a folder (it is created if missing)")
    parent = path if kind == pafs.FileType.Directory else posixpath.dirname(path)
    while fs.get_file_info(parent).type == pafs.FileType.NotFound and posixpath.dirname(parent) not in ("", parent):
        parent = posixpath.dirname(parent)
    if fs.get_file_info(parent).type == pafs.FileType.File:
        raise StorageError(f"{flag} {uri} is not writable: {parent} is a file, not a folder")
    try:
        _probe(fs, parent)
    except Exception as e:
        raise StorageError(f"{flag} {uri} is not writable: {str(e).splitlines()[0]}") from e
