"""The collection job: Ray actors run sweeps and write shards; the driver schedules them and keeps the catalog.

Failure model (what a user is promised; the rules themselves live in ``collectors.policy``):
- a worker that dies mid-sweep (killed, OOM, its node gone) costs that sweep only: it is retried on a fresh
  worker up to ``max_retries`` times, then recorded as failed with the reason; sweeps the dead worker had
  finished but not yet published in a shard are simply run again;
- a diverging sweep (NaN/inf) is recorded as failed and never written;
- a sweep is ``done`` only once the shard holding it is published, and its catalog row is committed after that
  (``meta.catalog.Appender``: a small part per commit, off the scheduler's thread), so killing the driver loses
  at most unpublished work; the next run adopts shards published after the last commit (from their JSON
  records) and redoes only what is missing;
- a resume checks every catalogued shard's size against the catalog (``meta.verify.check``): a damaged or
  missing shard is moved aside to ``damaged/`` and its sweeps are run again;
- a stop asked for (``stop``: a time limit, Ctrl-C) starts no new sweep; the running ones finish and every
  worker publishes what it holds, so a session-bounded collection loses nothing and the same command resumes.

Elastic: the pool is sized by the request (``num_workers``), not by the cluster's CPUs at the start. Every
worker is requested up front; one that cannot be placed yet waits for the autoscaler and gets work only once
it has started, so the job runs on the workers it has and grows as nodes join.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError, WorkerCrashedError
from tqdm import tqdm

from collectors import chaos, policy
from collectors.config import SweepSpec, WorkerSettings
from collectors.data import DataError, DataSettings
from collectors.policy import Fault, FaultKind, WorkerAction
from collectors.sweep import SweepDiverged, run_sweep, to_record
from meta import catalog, storage, verify
from meta.shards import ShardError, ShardInfo, ShardWriter, encode_sample, iter_shard

log = logging.getLogger(__name__)

_WORKER_DEATH = (ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError)


class WriterError(RuntimeError):
    """Writing or publishing a shard failed; the worker's open shard was discarded."""


@dataclass(frozen=True)
class SweepOutcome:
    """What a worker returns for one sweep: its record (or why it failed) and the shards it published."""

    sweep_id: str
    record: object = None  # collectors.sweep.to_record's, as the catalog and the shard take it
    error: str | None = None
    published: list[ShardInfo] = field(default_factory=list)


def _worker_logger(prefix: str) -> logging.Logger:
    """Stage lines on the worker's stdout, which Ray streams to the job log."""
    logger = logging.getLogger(f"{__name__}.worker")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[{prefix}] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


@ray.remote
class SweepWorker:
    """Runs sweeps one at a time and appends them to its own shard series under ``out/shards``."""

    def __init__(self, out: str, prefix: str, settings: DataSettings, threads: int, max_bytes: int, max_seconds: float,
                 chaos_spec: str | None, runner, path: str):
        torch.set_num_threads(threads)  # workers x threads <= cores: two workers never fight over a core
        self.settings, self.prefix, self.chaos, self.runner, self.path = settings, prefix, chaos_spec, runner, path
        self.log = _worker_logger(prefix)
        self.writer = ShardWriter(storage.join(out, catalog.SHARDS_DIR), prefix, max_bytes, max_seconds)

    def ready(self) -> str:
        """Answers once the worker is placed and constructed: the node it runs on."""
        return ray.get_runtime_context().get_node_id()

    def run(self, spec_json: str) -> SweepOutcome:
        spec = SweepSpec.model_validate_json(spec_json)
        sid = spec.sweep_id

        def on_stage(m):
            self.log.info(f"sweep {sid} {spec.family}/{spec.dataset} stage {m.stage + 1}/{spec.n_stages}: |D|={m.subset_size} "
                          f"train_loss={m.train_loss:.3f} test_acc={m.test_acc:.4f} ({m.wall_s:.1f}s)")
            chaos.maybe_kill(self.chaos, sid, m.stage)

        try:
            result = self.runner(spec, self.settings, on_stage=on_stage, path=self.path)
        except (SweepDiverged, DataError, ValueError) as e:
            return SweepOutcome(sid, error=f"{type(e).__name__}: {e}")
        record = to_record(result)

        def write():
            chaos.maybe_fail_write(self.chaos, sid)
            return self.writer.write(encode_sample(record, result.tensors))

        return SweepOutcome(sid, record=record, published=self._guarded(write))

    def flush(self) -> list[ShardInfo]:
        return self._guarded(self.writer.close)

    def _guarded(self, fn, *args):
        """A failed write leaves no half-written shard behind: the open shard is dropped, the driver told."""
        try:
            return fn(*args)
        except Exception as e:
            self.writer.abort()
            raise WriterError(f"{type(e).__name__}: {e}") from e


@dataclass
class Summary:
    out: str
    requested: int
    skipped: int  # already done (or failed, without --retry-failed) before this run
    adopted: int  # recovered from shards a crashed run published but did not catalog
    done: int = 0  # published and catalogued this run
    failed: int = 0
    completed: int = 0  # returned by a worker this run (published or not yet)
    failures: Counter = field(default_factory=Counter)  # why, this run
    earlier_failures: Counter = field(default_factory=Counter)  # why, sweeps an earlier run failed (not retried)
    damaged: list = field(default_factory=list)  # meta.verify.Damage of shards found damaged, with where they went
    bytes_written: int = 0
    total_bytes: int = 0
    catalog_bytes: int = 0  # written to the catalog this run (parts and merges)
    left: int = 0  # not started because a stop was asked for; the next run does them
    wall_s: float = 0.0

    @property
    def complete(self) -> bool:
        """Every requested sweep is done (none failed now or earlier, none left by a stop)."""
        return self.failed == 0 and not self.earlier_failures and not self.left

    def text(self) -> str:
        lines = [
            f"collection finished in {self.wall_s:.1f}s -> {self.out}",
            f"  requested {self.requested}: {self.skipped} already finished, {self.adopted} recovered from shards, "
            f"{self.done} done now, {self.failed} failed now",
            f"  bytes written this run: {self.bytes_written:,}; meta-dataset shards in total: {self.total_bytes:,}",
        ]
        lines += [f"  damaged shard {d.shard} ({d.why}): its {len(d.sweeps)} sweeps were run again; the file is kept as "
                  f"{where}" if where else f"  missing shard {d.shard}: its {len(d.sweeps)} sweeps were run again"
                  for d, where in self.damaged]
        lines += [f"  stopped as asked: {self.left} sweeps not started; the same command resumes them"] * bool(self.left)
        lines += [f"  failed x{n}: {why}" for why, n in self.failures.most_common()]
        lines += [f"  failed in an earlier run x{n}: {why} (--retry-failed runs them again)"
                  for why, n in self.earlier_failures.most_common()]
        return "\n".join(lines)


def _first_line(error: str) -> str:
    return error.splitlines()[0][:200] if error else "?"


def _requeue_damaged(out: str, table, appender: catalog.Appender) -> list:
    """Shards the catalog names that are missing or not their recorded size: moved aside, their sweeps recorded
    as ``lost`` (so this run does them again). Returns [(Damage, where the file went)]."""
    damaged = verify.check(out, table)
    if not damaged:
        return []
    rows = {r["sweep_id"]: r for r in catalog.read(out)}
    found = []
    for d in damaged:
        where = verify.set_aside(out, d.shard)
        why = f"shard {d.shard} {d.why}" + (f"; kept as {where}" if where else "")
        log.warning("%s: its %d sweeps will be run again", why, len(d.sweeps))
        appender.add(catalog.lost_row(rows[sid], why) for sid in d.sweeps)
        found.append((d, where))
    return found


def _adopt_orphans(out: str, status: dict[str, str], known: set[str]) -> list[dict]:
    """Catalog rows for sweeps in shards published after the last catalog commit (a driver killed in between);
    an orphan that cannot be read is moved aside."""
    fs, path = storage.resolve(out)
    shards_dir = storage.join(path, catalog.SHARDS_DIR)
    storage.remove_stale_temporaries(fs, shards_dir)
    adopted = {}
    for info in storage.list_files(fs, shards_dir, ".tar"):
        if info.base_name in known:
            continue
        uri = storage.uri_like(out, info.path)
        try:
            sha = storage.sha256(fs, info.path)
            samples = list(iter_shard(uri, sha256=sha))
        except ShardError as e:
            log.warning("unreadable orphan shard %s moved to %s: %s", info.base_name, verify.set_aside(out, info.base_name), e)
            continue
        shard = ShardInfo(info.base_name, info.path, sha, info.size, [s.key for s in samples])
        for s in samples:
            if status.get(s.key) != "done" and s.key not in adopted:
                adopted[s.key] = catalog.done_row(s.record, shard)
    return list(adopted.values())


def _shard_bytes(out: str) -> int:
    fs, path = storage.resolve(out)
    return sum(i.size for i in storage.list_files(fs, storage.join(path, catalog.SHARDS_DIR), ".tar"))


def _classify(e: Exception, kind: str) -> tuple[FaultKind, str]:
    """(the fault, its message) for what ``ray.get`` raised on a worker's start, sweep or flush."""
    if kind == "start":
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]  # Ray's last line says why the actor died
        return FaultKind.START_FAILED, f"worker could not start: {type(e).__name__}" + (f": {lines[-1][:300]}" if lines else "")
    if isinstance(e, RayTaskError) and isinstance(e.cause, WriterError):
        return FaultKind.WRITE_FAILED, f"shard write failed: {e.cause}"
    if isinstance(e, RayTaskError):  # a bug in sweep code: the traceback's last line says what
        return FaultKind.SWEEP_FAILED, "".join(traceback.format_exception_only(e.cause or e)).strip()
    return FaultKind.WORKER_DIED, f"worker died: {type(e).__name__}"


PROGRESS_EVERY_S = 10.0  # how long the driver waits for a result before reporting progress anyway


@dataclass
class _Slot:
    """One place in the pool: its current actor (re-created after a death) and the sweeps it holds unpublished."""

    index: int
    actor: object
    generation: int = 0
    started: bool = False
    failed_starts: int = 0
    unpublished: dict[str, object] = field(default_factory=dict)  # sweep id -> its record


class _Scheduler:
    """Workers, the queue, the work in flight and the attempts; every fault goes through ``policy.decide``."""

    def __init__(self, out: str, todo: list[SweepSpec], books: catalog.Appender, settings: DataSettings,
                 w: WorkerSettings, size: int, summary: Summary, on_progress, runner, stop: threading.Event):
        self.out, self.books, self.settings, self.w, self.summary = out, books, settings, w, summary
        self.runner, self.stop, self.stop_logged = runner, stop, False
        self.on_progress = on_progress or (lambda summary: None)
        self.by_id = {s.sweep_id: s for s in todo}
        self.queue = deque(self.by_id)
        self.attempts: Counter = Counter()
        self.inflight: dict = {}  # ObjectRef -> (slot, "start" | "run" | "flush", sweep id or None)
        self.run_tag = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.chaos_spec = os.environ.get(chaos.ENV)
        self.bar = tqdm(total=len(self.queue), desc="sweeps", unit="sweep", dynamic_ncols=True)
        self.retired_why = ""  # the error that retired the last worker given up on
        self.slots = [self._spawn(_Slot(i, None)) for i in range(size)]

    def _spawn(self, slot: _Slot) -> _Slot:
        w = self.w
        slot.actor = SweepWorker.options(num_cpus=w.cpus_per_worker, max_restarts=0).remote(
            self.out, f"{self.run_tag}-w{slot.index}g{slot.generation}", self.settings, w.threads_per_worker,
            w.shard_max_bytes, w.shard_max_seconds, self.chaos_spec, self.runner, w.sweep_path)
        slot.started = False
        self.inflight[slot.actor.ready.remote()] = (slot, "start", None)  # answers once placed: may wait for a node
        return slot

    def run(self) -> None:
        try:
            while self.slots and (self._wanted() or self._working()):
                self._log_stop()
                self._dispatch()
                refs = list(self.inflight)
                ready, _ = ray.wait(refs, num_returns=1, timeout=PROGRESS_EVERY_S)
                if ready:  # and everything else that is ready: one pass of the loop for a burst of results
                    for ref in ray.wait(refs, num_returns=len(refs), timeout=0)[0] or ready:
                        self._handle(ref)
                else:
                    log.info("%d of %d workers running, %d sweeps queued", sum(s.started for s in self.slots),
                             len(self.slots), len(self.queue))
                self.on_progress(self.summary)
            if self.slots:
                self.summary.left = len(self.queue)  # nonzero only after a stop
            else:
                self._strand()
        finally:
            self.bar.close()
            for slot in self.slots:
                ray.kill(slot.actor)  # pending ones too: a replacement still waiting for a node

    def _wanted(self) -> bool:
        """Sweeps remain to hand out, and no stop has been asked for."""
        return bool(self.queue) and not self.stop.is_set()

    def _log_stop(self) -> None:
        """Say once, when a stop is first seen, what finishes and what is left."""
        if self.stop.is_set() and not self.stop_logged:
            self.stop_logged = True
            running = sum(kind == "run" for _, kind, _ in self.inflight.values())
            log.warning("stopping: no new sweeps; %d running finish and are published, %d left for the next run",
                        running, len(self.queue))

    def _working(self) -> bool:
        return any(kind != "start" for _, kind, _ in self.inflight.values()) or any(s.unpublished for s in self.slots)

    def _dispatch(self) -> None:
        busy = {id(slot) for slot, _, _ in self.inflight.values()}
        for slot in self.slots:
            if id(slot) in busy or not slot.started:
                continue
            if self._wanted():
                sid = self.queue.popleft()
                self.inflight[slot.actor.run.remote(self.by_id[sid].model_dump_json())] = (slot, "run", sid)
            elif slot.unpublished:
                self.inflight[slot.actor.flush.remote()] = (slot, "flush", None)

    def _handle(self, ref) -> None:
        slot, kind, sid = self.inflight.pop(ref)
        try:
            result = ray.get(ref)
        except (*_WORKER_DEATH, RayTaskError) as e:
            return self._apply(slot, *_classify(e, kind), sid)
        if kind == "start":
            slot.started, slot.failed_starts = True, 0
            log.info("worker %d started on node %s", slot.index, result[:12])
        elif kind == "flush":
            self._record_published(result, slot)
        elif result.error is not None:
            self._apply(slot, FaultKind.SWEEP_FAILED, result.error, sid)
        else:
            slot.unpublished[sid] = result.record
            self.summary.completed += 1
            self.bar.update(1)
            self._record_published(result.published, slot)

    def _apply(self, slot: _Slot, kind: FaultKind, error: str, sid: str | None) -> None:
        slot.failed_starts += kind is FaultKind.START_FAILED
        decision = policy.decide(Fault(kind, _first_line(error) if kind is not FaultKind.SWEEP_FAILED else error, sid,
                                       tuple(slot.unpublished), dict(self.attempts), self.w.max_retries, slot.failed_starts))
        for s in decision.charged:
            self.attempts[s] += 1
        for s, why in decision.failed:
            self._fail(s, why)
        self.queue.extendleft(reversed(decision.retry))
        if decision.worker is not WorkerAction.KEEP:
            ray.kill(slot.actor)  # an unavailable actor may come back: it must not publish behind our back
            self.bar.update(-len(slot.unpublished))
            log.warning("worker %d: %s; %d unpublished sweeps re-queued; worker %sd", slot.index, _first_line(error),
                        len(slot.unpublished), decision.worker.value)
            slot.unpublished = {}
        if decision.worker is WorkerAction.REPLACE:
            slot.generation += 1
            self._spawn(slot)
        elif decision.worker is WorkerAction.RETIRE:
            self.slots.remove(slot)
            self.retired_why = _first_line(error)

    def _record_published(self, infos: list[ShardInfo], slot: _Slot) -> None:
        for info in infos:
            self.summary.bytes_written += info.bytes
            self.books.add(catalog.done_row(slot.unpublished.pop(sid), info, self.attempts[sid] + 1) for sid in info.keys)
            self.summary.done += len(info.keys)

    def _fail(self, sid: str, error: str) -> None:
        self.books.add([catalog.failed_row(sid, self.by_id[sid].model_dump(mode="json"), error, self.attempts[sid])])
        self.summary.failed += 1
        self.summary.failures[_first_line(error)] += 1
        self.bar.update(1)

    def _strand(self) -> None:
        """Every worker was given up on: the sweeps still queued fail, naming why."""
        while self.queue:
            self._fail(self.queue.popleft(), f"no worker left: {self.retired_why}")


def _resume(out: str, specs: list[SweepSpec], retry_failed: bool, books: catalog.Appender) -> tuple[list, Summary]:
    """What is left to do in ``out``: damaged shards re-queued, orphan shards adopted; (todo, summary so far)."""
    catalog.remove_merged_leftovers(out)
    table = catalog.read_table(out, ["status", "error", "shard", "shard_bytes", "shard_sha256"])
    damaged = _requeue_damaged(out, table, books)
    cols = table.select(["sweep_id", "status", "error", "shard"]).to_pydict()
    lost = {sid for d, _ in damaged for sid in d.sweeps}
    status = {sid: ("lost" if sid in lost else st) for sid, st in zip(cols["sweep_id"], cols["status"])}
    errors = dict(zip(cols["sweep_id"], cols["error"]))
    finished = {"done"} | (set() if retry_failed else {"failed"})
    skipped = sum(status.get(s.sweep_id) in finished for s in specs)
    earlier = Counter(_first_line(errors[s.sweep_id]) for s in specs
                      if not retry_failed and status.get(s.sweep_id) == "failed")
    known = {sh for sid, sh in zip(cols["sweep_id"], cols["shard"]) if status[sid] == "done"}
    adopted = _adopt_orphans(out, status, known)
    books.add(adopted)
    status |= {r["sweep_id"]: "done" for r in adopted}
    todo = [s for s in specs if status.get(s.sweep_id) not in finished]
    return todo, Summary(out, len(specs), skipped, len(adopted), earlier_failures=earlier, damaged=damaged)


def collect(
    specs: list[SweepSpec],
    out: str,
    settings: DataSettings,
    workers: WorkerSettings | None = None,
    num_workers: int | None = None,
    retry_failed: bool = False,
    on_progress=None,
    runner=run_sweep,
    stop: threading.Event | None = None,
) -> Summary:
    """Run the sweeps in ``specs`` that ``out`` does not hold yet with ``num_workers`` workers (default: as many
    as the cluster's CPUs hold now); ``on_progress(summary)`` is called as results come in. Returns what happened.
    ``runner(spec, settings, on_stage=…)`` trains one sweep (``bench/scale.py`` passes a simulated one). Once
    ``stop`` is set no new sweep starts; the running ones finish and are published (``Summary.left``)."""
    t0 = time.perf_counter()
    out = storage.normalize(out)  # workers may run in another folder: local paths become absolute
    storage.check_writable(out)
    w = workers or WorkerSettings()
    books = catalog.Appender(out)
    try:
        todo, summary = _resume(out, specs, retry_failed, books)
        if todo:
            if not ray.is_initialized():
                ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
            size = policy.pool_size(num_workers, ray.cluster_resources().get("CPU", 0), w.cpus_per_worker, len(todo))
            log.info("requesting %d workers (%g CPUs each) for %d sweeps", size, w.cpus_per_worker, len(todo))
            _Scheduler(out, todo, books, settings, w, size, summary, on_progress, runner, stop or threading.Event()).run()
    finally:
        books.close()  # every row of a published shard is committed, even when the run is interrupted
    summary.total_bytes, summary.catalog_bytes = _shard_bytes(out), books.bytes_written
    summary.wall_s = time.perf_counter() - t0
    return summary
