"""The collection's failure policy: what happens to a worker and its sweeps when something goes wrong.

A pure function of one ``Fault`` (what happened, to which sweeps, with how many attempts already spent):
no Ray, no I/O, so every rule is tested case by case (tests/test_policy.py). The scheduler in
``collectors.collect`` applies the ``Decision``.

Rules:
- a sweep that fails by itself (diverged, bad data, a bug in sweep code) fails at once: running it again
  would fail again; its worker goes on;
- a worker that dies (killed, OOM, its node gone) is replaced; the sweep it was running is charged an
  attempt and retried, or failed once it has used ``max_retries`` retries; sweeps it had finished but not yet
  published are run again at no charge;
- a failed shard write replaces the worker too, and charges every sweep the discarded shard held (a disk
  that stays full ends in failed sweeps, not an endless loop);
- a worker that cannot even start is replaced, up to ``max_retries`` times in a row, then retired.

A shrinking cluster needs no rule of its own: a replacement that cannot be placed waits for capacity and
holds no work (the scheduler hands sweeps only to started workers), so the job goes on with the workers it
has and grows again when nodes join.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum


class FaultKind(str, Enum):
    SWEEP_FAILED = "sweep failed"  # the sweep's own error: deterministic, not retried
    WORKER_DIED = "worker died"
    WRITE_FAILED = "shard write failed"
    START_FAILED = "worker could not start"


class WorkerAction(str, Enum):
    KEEP = "keep"
    REPLACE = "replace"
    RETIRE = "retire"


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    error: str  # one line, for the catalog and the summary
    sweep: str | None = None  # the sweep the worker was running; None for a flush or a start
    unpublished: tuple[str, ...] = ()  # finished on that worker, not yet in a published shard
    attempts: Mapping[str, int] = field(default_factory=dict)  # attempts charged so far, per sweep
    max_retries: int = 2
    failed_starts: int = 0  # failed starts of this worker slot in a row, this one included


@dataclass(frozen=True)
class Decision:
    worker: WorkerAction
    charged: tuple[str, ...] = ()  # sweeps whose attempt count grows by one
    retry: tuple[str, ...] = ()  # back to the front of the queue, in this order
    failed: tuple[tuple[str, str], ...] = ()  # (sweep, reason) recorded as failed


def decide(fault: Fault) -> Decision:
    """The policy; see the module's docstring."""
    if fault.kind is FaultKind.START_FAILED:
        give_up = fault.failed_starts > fault.max_retries
        return Decision(WorkerAction.RETIRE if give_up else WorkerAction.REPLACE)
    if fault.kind is FaultKind.SWEEP_FAILED:
        if fault.sweep is None:
            raise ValueError(f"a {fault.kind.value} fault needs the sweep it happened to, got {fault}")
        return Decision(WorkerAction.KEEP, charged=(fault.sweep,), failed=((fault.sweep, fault.error),))
    running = (fault.sweep,) if fault.sweep is not None else ()
    charged = running + (fault.unpublished if fault.kind is FaultKind.WRITE_FAILED else ())
    exhausted = {s for s in charged if fault.attempts.get(s, 0) + 1 > fault.max_retries}
    failed = tuple((s, f"{fault.error} (on all {fault.attempts.get(s, 0) + 1} attempts)") for s in charged if s in exhausted)
    free = () if fault.kind is FaultKind.WRITE_FAILED else fault.unpublished
    retry = tuple(s for s in charged if s not in exhausted) + free
    return Decision(WorkerAction.REPLACE, charged=charged, retry=retry, failed=failed)


def pool_size(requested: int | None, cluster_cpus: float, cpus_per_worker: float, sweeps: int) -> int:
    """Workers to ask for: ``requested`` (they wait for the autoscaler if the cluster lacks the CPUs), else as
    many as the cluster's CPUs hold now; never more than there are sweeps to run."""
    if requested is None:
        requested = int(cluster_cpus // cpus_per_worker)
        if requested < 1:
            raise ValueError(
                f"the cluster has {cluster_cpus:g} CPUs now, too few for one worker at workers.cpus_per_worker="
                f"{cpus_per_worker:g}; pass --num-workers N to request N workers (an autoscaling cluster adds nodes for them)"
            )
    if requested < 1:
        raise ValueError(f"num_workers must be >= 1, got {requested}")
    return min(requested, sweeps)
