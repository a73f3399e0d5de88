"""Fault injection for the failure tests: kill a worker process at a chosen sweep and stage, once.

Set ``OBLIVION_CHAOS=<dir>:<sweep_id>@<stage>[,<sweep_id>@<stage>…]`` in the driver's environment. The
worker running that sweep exits abruptly (``os._exit``, as an OOM kill would) after that stage, and leaves a
marker in ``<dir>`` so that the retry runs through. ``<sweep_id>@write`` instead makes writing that sweep's
shard sample fail once (as a full disk would), and ``<sweep_id>@<stage>=hang`` makes the worker write its
Ray node id into the marker and stall there, so that a test can kill the whole node under it. Unset, this
costs one string comparison per stage.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "OBLIVION_CHAOS"


def _fire_once(spec: str | None, target: str) -> bool:
    if not spec:
        return False
    directory, _, targets = spec.partition(":")
    marker = Path(directory) / f"{target}.fired"
    if target not in targets.split(",") or marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def maybe_kill(spec: str | None, sweep_id: str, stage: int) -> None:
    if _fire_once(spec, f"{sweep_id}@{stage}"):
        os._exit(137)
    if _fire_once(spec, f"{sweep_id}@{stage}=hang"):
        import ray

        directory = spec.partition(":")[0]
        tmp = Path(directory) / f".{sweep_id}@{stage}.node"
        tmp.write_text(ray.get_runtime_context().get_node_id())
        tmp.replace(Path(directory) / f"{sweep_id}@{stage}.node")
        time.sleep(3600)


def maybe_fail_write(spec: str | None, sweep_id: str) -> None:
    if _fire_once(spec, f"{sweep_id}@write"):
        raise OSError(f"injected write failure for sweep {sweep_id}")
