"""What every command line shares, so that one idea has one flag everywhere (the table in docs/development.md):
old spellings stay accepted, hidden from --help, for a release; a collection root given as its ``shards/``
subfolder is understood; bad input is one line ``error: …`` on stderr with exit status 2. Torch-free, so that
``meta.status`` starts quickly."""

from __future__ import annotations

import argparse
import logging
import sys

from meta import catalog, storage

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (like every other bad input) and flags with hidden old spellings."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._required: list[tuple[str, str]] = []  # (flag, dest): required, whichever spelling gives it
        self._positional: dict[str, str] = {}  # dest -> dest of its old positional spelling

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")

    def add_flag(self, flag: str, *old: str, required: bool = False, **kwargs) -> argparse.Action:
        """``flag`` plus its old spellings ``old`` (``--x``, or a bare name for a former positional argument)."""
        dest = flag.lstrip("-").replace("-", "_")
        action = self.add_argument(flag, dest=dest, **kwargs)
        hidden = {k: v for k, v in kwargs.items() if k in ("type", "nargs", "action", "metavar")}
        for name in old:
            if name.startswith("-"):
                self.add_argument(name, dest=dest, **hidden, help=argparse.SUPPRESS)
            else:
                positional = "*" if kwargs.get("nargs") in ("+", "*") else "?"
                self._positional[dest] = f"_old_{name}"
                self.add_argument(f"_old_{name}", nargs=positional, type=kwargs.get("type"), help=argparse.SUPPRESS)
        if required:
            self._required.append((flag, dest))
        return action

    def parse_known_args(self, args=None, namespace=None):
        setup_logging()
        ns, rest = super().parse_known_args(args, namespace)
        for dest, old in self._positional.items():
            value = getattr(ns, old, None)
            if hasattr(ns, old):
                delattr(ns, old)
            if value and getattr(ns, dest) is None:
                setattr(ns, dest, value)
        missing = [flag for flag, dest in self._required if getattr(ns, dest) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return ns, rest


def setup_logging(level: int = logging.INFO) -> None:
    """Logging for every command, configured once where its arguments are parsed: the library's ``log.info``
    lines reach the user (timestamped: collections and trainings run for hours); a no-op where the root logger
    already has handlers (an embedding application, pytest)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def collection(value: str) -> str:
    """``--collection``'s type: the folder or URI that holds catalog.parquet and shards/; its ``shards/`` subfolder,
    given by mistake, is understood as the collection."""
    base, sep, query = value.partition("?")
    head, _, name = base.rstrip("/").rpartition("/")
    if name != catalog.SHARDS_DIR or not head:
        return value
    try:
        return head + sep + query if catalog.exists(head + sep + query) and not catalog.exists(value) else value
    except OSError:  # an unreachable store: the command names it when it reads
        return value


def add_collection(p: Parser, *old: str, **kwargs) -> argparse.Action:
    """The collection root flag, ``--collection DIR|URI``."""
    kwargs.setdefault("metavar", "DIR|URI")
    return p.add_flag("--collection", *old, type=collection, **kwargs)


def require_collection(root: str) -> None:
    """Refuse a ``root`` without a catalog (a missing folder, a typo) in one line naming it."""
    if not catalog.exists(root):
        raise storage.StorageError(f"no catalog under {root}: not a collection (yet); give the folder that holds "
                                   f"{catalog.FILENAME} and {catalog.SHARDS_DIR}/")


def fail(message: object) -> int:
    """Print a bad input as one line ``error: …`` on stderr; returns the exit status for it."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print(f"error: {'; '.join(lines)}", file=sys.stderr)
    return EXIT_BAD_INPUT
