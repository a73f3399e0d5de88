"""The experiment's fine-tunes as Ray tasks, with the collector's failure policy (``collectors.policy.decide``):
a fine-tune whose own code raises fails at once (it would fail again); one whose worker dies (killed, out of
memory, its node gone) is retried up to ``max_retries`` times, then recorded as failed. Every result reaches
``on_result`` the moment it finishes, so the caller logs it and a killed experiment loses only what was in
flight."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass

from collectors import data
from collectors.policy import Fault, FaultKind, decide
from evaluation import summary, tracking
from evaluation.config import Downstream, TransferConfig
from evaluation.inits import Init
from evaluation.trajectories import Trajectory


class FinetuneError(RuntimeError):
    """Fine-tunes that failed for good; the message lists them (the run is marked failed, nothing is summarised)."""


@dataclass
class Job:
    key: tracking.Key
    init: Init
    traj: Trajectory


def plan_jobs(cfg: TransferConfig, trajs: dict[int, Trajectory], inits: dict[int, dict[str, Init]],
              done: dict[tracking.Key, dict]) -> list[Job]:
    """Every (initialisation, pre-training seed, seed) fine-tune of the config that has no finished child run."""
    seeds = [cfg.seed + i for i in range(cfg.downstream.seeds)]
    scratch = {"scratch": Init(dict(summary.SCRATCH), None)} if cfg.scratch else {}
    return [Job((name, p, seed), init, trajs[p]) for p in trajs for name, init in {**scratch, **inits[p]}.items()
            for seed in seeds if (name, p, seed) not in done]


def _finetune_job(init, family, arch, task_json, settings, seed, path, tuning_json):
    from evaluation.config import Tuning
    from evaluation.finetune import finetune

    tuning = Tuning.model_validate_json(tuning_json) if tuning_json else None
    return finetune(init, family, arch, Downstream.model_validate_json(task_json), settings, seed, path=path, tuning=tuning)


def classify(e: Exception) -> tuple[FaultKind, str]:
    """(the fault, one line) for what ``ray.get`` raised on a fine-tune."""
    from ray.exceptions import RayTaskError

    if isinstance(e, RayTaskError):  # the fine-tune's own error: the traceback's last line says what
        return FaultKind.SWEEP_FAILED, "".join(traceback.format_exception_only(e.cause or e)).strip().splitlines()[-1][:300]
    return FaultKind.WORKER_DIED, f"worker died: {type(e).__name__}"


def run_finetunes(jobs: list[Job], cfg: TransferConfig, settings: data.DataSettings, workers: int | None,
                  on_result: Callable[[dict], None], max_retries: int = 2) -> list[dict]:
    """Run every job, at most ``workers`` at once (default: the cluster's CPUs); raises ``FinetuneError`` naming
    the fine-tunes that failed for good, after every other one has finished and reached ``on_result``."""
    import ray
    from tqdm import tqdm

    remote = ray.remote(num_cpus=1, max_retries=0)(_finetune_job)  # retries are the policy's, not Ray's
    tuning = cfg.tuning.model_dump_json() if cfg.tuning else None
    limit = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    put, inflight, attempts, failed, results = {}, {}, {}, [], []
    pending = list(jobs)

    def submit(job: Job):
        state = job.init.state
        if state is not None and id(state) not in put:
            put[id(state)] = ray.put(state)
        task = cfg.downstream.model_copy(update=job.init.finetune).model_dump_json()
        ref = remote.remote(put[id(state)] if state is not None else None, job.traj.family, job.traj.arch, task,
                            settings, job.key[2], cfg.path, tuning)
        inflight[ref] = job

    with tqdm(total=len(jobs), desc="fine-tunes", unit="run") as bar:
        while pending or inflight:
            while pending and len(inflight) < limit:
                submit(pending.pop(0))
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            job = inflight.pop(ref)
            try:
                result = {"init": job.key[0], "pretrain_seed": job.key[1], "seed": job.key[2], **ray.get(ref)}
            except ray.exceptions.RayError as e:
                name = str(job.key)
                decision = decide(Fault(*classify(e), sweep=name, attempts=attempts, max_retries=max_retries))
                for s in decision.charged:
                    attempts[s] = attempts.get(s, 0) + 1
                if decision.retry:
                    pending.insert(0, job)
                    continue
                failed += [f"{name}: {reason}" for _, reason in decision.failed]
            else:
                on_result(result)
                results.append(result)
            bar.update(1)
    if failed:
        raise FinetuneError(f"{len(failed)} of {len(jobs)} fine-tunes failed:\n  " + "\n  ".join(failed[:10]))
    return results
