"""Fault injection for the failure tests: kill a worker process at a chosen sweep and stage, once.

Set ``OBLIVION_CHAOS=<dir>:<sweep_id>@<stage>[,<sweep_id>@<stage>…]`` in the driver's environment. The
worker running that sweep exits abruptly (``os._exit``, as an OOM kill would) after that stage, and leaves a
marker in ``<dir>`` so that the retry runs through. Unset, this costs one string comparison per stage.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "OBLIVION_CHAOS"


def maybe_kill(spec: str | None, sweep_id: str, stage: int) -> None:
    if not spec:
        return
    directory, _, targets = spec.partition(":")
    if f"{sweep_id}@{stage}" not in targets.split(","):
        return
    marker = Path(directory) / f"{sweep_id}@{stage}.killed"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os._exit(137)
