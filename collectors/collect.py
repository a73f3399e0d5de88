"""The collection job: Ray actors run sweeps and write shards; the driver coordinates and keeps the catalog.

Failure model (what a user is promised):
- a worker that dies mid-sweep (killed, OOM) costs that sweep only: it is retried on a fresh worker up to
  ``max_retries`` times, then recorded as failed with the reason; sweeps the dead worker had finished but not
  yet published in a shard are simply run again;
- a diverging sweep (NaN/inf) is recorded as failed and never written;
- a sweep is ``done`` only once the shard holding it is published, and the catalog is rewritten after that,
  so killing the driver loses at most unpublished work; the next run adopts shards published after the last
  catalog write (from their JSON records) and redoes only what is missing.
"""

from __future__ import annotations

import os
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError
from tqdm import tqdm

from collectors import chaos
from collectors.config import SweepSpec, WorkerSettings
from collectors.data import DataError, DataSettings
from collectors.sweep import SweepDiverged, run_sweep, to_record
from meta import catalog, storage
from meta.shards import ShardError, ShardInfo, ShardWriter, encode_sample, iter_shard

_WORKER_DEATH = (ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError)


class WriterError(RuntimeError):
    """Writing or publishing a shard failed; the worker's open shard was discarded."""


@ray.remote
class SweepWorker:
    """Runs sweeps one at a time and appends them to its own shard series under ``out/shards``."""

    def __init__(self, out: str, prefix: str, settings: DataSettings, threads: int, max_bytes: int, max_seconds: float, chaos_spec: str | None):
        torch.set_num_threads(threads)  # workers x threads <= cores: two workers never fight over a core
        self.settings, self.prefix, self.chaos = settings, prefix, chaos_spec
        self.writer = ShardWriter(storage.join(out, catalog.SHARDS_DIR), prefix, max_bytes, max_seconds)

    def run(self, spec_json: str) -> dict:
        spec = SweepSpec.model_validate_json(spec_json)
        sid = spec.sweep_id

        def on_stage(m):
            print(f"[{self.prefix}] sweep {sid} {spec.family}/{spec.dataset} stage {m.stage + 1}/{spec.n_stages}: "
                  f"|D|={m.subset_size} train_loss={m.train_loss:.3f} test_acc={m.test_acc:.4f} ({m.wall_s:.1f}s)", flush=True)
            chaos.maybe_kill(self.chaos, sid, m.stage)

        try:
            result = run_sweep(spec, self.settings, on_stage=on_stage)
        except (SweepDiverged, DataError, ValueError) as e:
            return {"sweep_id": sid, "ok": False, "error": f"{type(e).__name__}: {e}", "published": []}
        record = to_record(result)

        def write():
            chaos.maybe_fail_write(self.chaos, sid)
            return self.writer.write(encode_sample(record, result.tensors))

        published = self._guarded(write)
        return {"sweep_id": sid, "ok": True, "record": record, "published": published}

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
    done: int = 0
    failed: int = 0
    failures: Counter = field(default_factory=Counter)
    bytes_written: int = 0
    total_bytes: int = 0
    wall_s: float = 0.0

    def text(self) -> str:
        lines = [
            f"collection finished in {self.wall_s:.1f}s -> {self.out}",
            f"  requested {self.requested}: {self.skipped} already finished, {self.adopted} recovered from shards, "
            f"{self.done} done now, {self.failed} failed now",
            f"  bytes written this run: {self.bytes_written:,}; meta-dataset shards in total: {self.total_bytes:,}",
        ]
        lines += [f"  failed x{n}: {why}" for why, n in self.failures.most_common()]
        return "\n".join(lines)


def _adopt_orphans(out: str, rows: dict[str, dict]) -> int:
    """Catalog sweeps from shards published after the last catalog write (a driver killed in between)."""
    fs, path = storage.resolve(out)
    shards_dir = storage.join(path, catalog.SHARDS_DIR)
    storage.remove_stale_temporaries(fs, shards_dir)
    known = {r["shard"] for r in rows.values() if r["status"] == "done"}
    adopted = 0
    for info in storage.list_files(fs, shards_dir, ".tar"):
        if info.base_name in known:
            continue
        uri = storage.uri_like(out, info.path)
        try:
            sha = storage.sha256(fs, info.path)
            samples = list(iter_shard(uri, sha256=sha))
        except ShardError as e:
            print(f"warning: ignoring unreadable orphan shard {info.base_name}: {e}", flush=True)
            continue
        shard = ShardInfo(info.base_name, info.path, sha, info.size, [s.key for s in samples])
        for s in samples:
            if rows.get(s.key, {}).get("status") != "done":
                rows[s.key] = catalog.done_row(s.record, shard)
                adopted += 1
    return adopted


def _shard_bytes(out: str) -> int:
    fs, path = storage.resolve(out)
    return sum(i.size for i in storage.list_files(fs, storage.join(path, catalog.SHARDS_DIR), ".tar"))


CAPACITY_CHECK_S = 10.0  # how long the driver waits for any result before re-checking the cluster's size


def _room(w: WorkerSettings) -> int:
    """Workers the cluster's live CPUs hold now (a dead node's CPUs drop out once Ray notices it)."""
    return int(ray.cluster_resources().get("CPU", 0) // w.cpus_per_worker)


def collect(
    specs: list[SweepSpec],
    out: str,
    settings: DataSettings,
    workers: WorkerSettings | None = None,
    num_workers: int | None = None,
    retry_failed: bool = False,
) -> Summary:
    """Run the sweeps in ``specs`` that ``out`` does not hold yet; return what happened."""
    t0 = time.perf_counter()
    out = storage.normalize(out)  # workers may run in another folder: local paths become absolute
    storage.check_writable(out)
    w = workers or WorkerSettings()
    rows = {r["sweep_id"]: r for r in catalog.read(out)}
    finished = {"done"} | (set() if retry_failed else {"failed"})
    skipped = sum(rows.get(s.sweep_id, {}).get("status") in finished for s in specs)
    adopted = _adopt_orphans(out, rows)
    if adopted:
        catalog.write(out, rows.values())

    todo = deque(s for s in specs if rows.get(s.sweep_id, {}).get("status") not in finished)
    summary = Summary(out, len(specs), skipped, adopted)
    if not todo:
        summary.total_bytes, summary.wall_s = _shard_bytes(out), time.perf_counter() - t0
        return summary

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    cpus = ray.cluster_resources().get("CPU", 0)
    if w.cpus_per_worker > cpus:
        raise ValueError(f"workers.cpus_per_worker={w.cpus_per_worker} exceeds the cluster's {cpus} CPUs: no worker could start")
    capacity = max(1, _room(w))
    if num_workers is not None and num_workers > capacity:
        print(f"--num-workers {num_workers} exceeds what {cpus:g} CPUs hold at {w.cpus_per_worker:g} each; using {capacity}")
    num_workers = min(num_workers or capacity, capacity, len(todo))
    run_tag = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    chaos_spec = os.environ.get(chaos.ENV)

    def new_worker(i: int, gen: int):
        return SweepWorker.options(num_cpus=w.cpus_per_worker, max_restarts=0).remote(
            out, f"{run_tag}-w{i}g{gen}", settings, w.threads_per_worker, w.shard_max_bytes, w.shard_max_seconds, chaos_spec
        )

    generation = [0] * num_workers
    replacements: list[int] = []  # workers re-created after a death, newest last
    retiring: set[int] = set()
    workers = [new_worker(i, 0) for i in range(num_workers)]
    by_id = {s.sweep_id: s for s in specs}
    attempts: Counter = Counter()
    pending: dict[int, dict[str, dict]] = {i: {} for i in range(num_workers)}  # finished, not yet in a shard
    inflight: dict = {}  # ObjectRef -> (worker index, sweep id or None for a flush)
    bar = tqdm(total=len(todo), desc="sweeps", unit="sweep", dynamic_ncols=True)

    def record_published(infos: list[ShardInfo], i: int) -> None:
        for info in infos:
            summary.bytes_written += info.bytes
            for sid in info.keys:
                rec = pending[i].pop(sid)
                rows[sid] = catalog.done_row(rec, info, attempts[sid] + 1)
                summary.done += 1
        if infos:
            catalog.write(out, rows.values())

    def fail(sid: str, error: str, n_attempts: int) -> None:
        rows[sid] = catalog.failed_row(sid, by_id[sid].model_dump(mode="json"), error, n_attempts)
        summary.failed += 1
        summary.failures[error.splitlines()[0][:200]] += 1
        catalog.write(out, rows.values())
        bar.update(1)

    def retire(j: int, requeue: list[str]) -> None:
        """Stop using worker j (the shrunken cluster cannot place it): ``requeue`` and what it finished but
        never published run again, with no attempt charged."""
        workers[j] = None
        unpublished = list(pending[j])
        pending[j] = {}
        bar.update(-len(unpublished))
        todo.extendleft(by_id[s] for s in reversed(requeue + unpublished))
        print(f"worker {j} retired: the cluster now holds {_room(w)} workers", flush=True)

    try:
        while todo or inflight or any(pending.values()):
            busy = {i for i, _ in inflight.values()}
            for i in range(num_workers):
                if i in busy or workers[i] is None:
                    continue
                if todo:
                    sid = todo.popleft().sweep_id
                    inflight[workers[i].run.remote(by_id[sid].model_dump_json())] = (i, sid)
                elif pending[i]:
                    inflight[workers[i].flush.remote()] = (i, None)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=CAPACITY_CHECK_S)
            if not ready:  # nothing finished for a while: did the cluster shrink under a replacement worker?
                alive = [j for j, a in enumerate(workers) if a is not None and j not in retiring]
                waiting = [j for j in replacements if j in alive]
                if len(alive) > max(_room(w), 1) and waiting:
                    j = waiting[-1]
                    ray.kill(workers[j])
                    if any(k == j for k, _ in inflight.values()):
                        retiring.add(j)  # its queued sweep comes back through the death path below
                    else:
                        retire(j, [])
                continue
            i, sid = inflight.pop(ready[0])
            try:
                res = ray.get(ready[0])
            except (*_WORKER_DEATH, ray.exceptions.RayTaskError) as e:
                if i in retiring:  # retired on purpose (it could not be placed): no attempt charged
                    retiring.discard(i)
                    retire(i, [sid] if sid else [])
                    continue
                writer_failed = isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, WriterError)
                if isinstance(e, ray.exceptions.RayTaskError) and not writer_failed:  # a bug in sweep code
                    fail(sid, "".join(traceback.format_exception_only(e.cause or e)).strip(), attempts[sid] + 1)
                    continue
                reason = f"shard write failed: {e.cause}" if writer_failed else f"worker died: {type(e).__name__}"
                lost = list(pending[i])  # finished on that worker but never published: run them again
                pending[i] = {}
                ray.kill(workers[i])  # an unavailable actor may come back: it must not publish behind our back
                alive, room = sum(a is not None and j not in retiring for j, a in enumerate(workers)), _room(w)
                if alive > 1 and alive > room:  # the cluster lost CPUs (a node): go on with fewer workers
                    retire(i, [])  # instead of waiting for a replacement that cannot be placed
                else:  # (if the loss is not visible yet, the capacity check above retires it later)
                    generation[i] += 1
                    workers[i] = new_worker(i, generation[i])
                    replacements.append(i)
                print(f"worker {i}: {reason}; {len(lost)} unpublished sweeps re-queued", flush=True)
                bar.update(-len(lost))
                # a dead worker charges only the sweep it was running; a failing write charges every sweep
                # it lost, so a full disk ends in failed rows instead of an endless loop
                for s in ([sid] if sid is not None else []) + (lost if writer_failed else []):
                    attempts[s] += 1
                    if attempts[s] > w.max_retries:
                        fail(s, f"{reason} (on all {attempts[s]} attempts)", attempts[s])
                    else:
                        todo.appendleft(by_id[s])
                if not writer_failed:
                    todo.extendleft(by_id[s] for s in reversed(lost))
                continue
            if sid is None:
                record_published(res, i)
                continue
            if not res["ok"]:
                fail(sid, res["error"], attempts[sid] + 1)
                continue
            pending[i][sid] = res["record"]
            bar.update(1)
            record_published(res["published"], i)
    finally:
        bar.close()
        for a in workers:
            if a is not None:
                ray.kill(a)
    summary.total_bytes, summary.wall_s = _shard_bytes(out), time.perf_counter() - t0
    return summary
