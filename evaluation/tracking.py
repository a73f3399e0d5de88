"""An experiment's MLflow runs, written so a killed experiment resumes: one parent run per config (found again
by the config's digest), one child run per (initialisation, pre-training seed, seed) logged the moment its
fine-tune finishes. A rerun continues the latest unfinished parent of the same config and skips every pair
with a FINISHED child; a child the kill caught half-written is deleted and its fine-tune runs again, so no
pair is ever logged twice."""

from __future__ import annotations

import hashlib
import logging
import time

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from evaluation.summary import ROLE_TAG

log = logging.getLogger(__name__)
CONFIG_TAG = "oblivion.config_sha256"
SOURCE_TAG = "oblivion.source_sha256"  # the source config and sweep path: the pre-trained models it trains
CURVES = ("head_train_loss", "head_train_acc", "full_train_loss", "full_train_acc")
Key = tuple[str, int, int]  # (init, pre-training seed, downstream seed)
RATES = ("val_lr", "test_lr")  # a tuned fine-tune's accuracy per learning-rate factor: metric "<name><factor>"


def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def unfinished_parent(client: MlflowClient, experiment_id: str, digest: str) -> str | None:
    """The latest parent run of this exact config that did not finish (killed, failed, or still marked
    RUNNING because its process died), or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'experiment' and tags.`{CONFIG_TAG}` = '{digest}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs and runs[0].info.status != "FINISHED" else None


def source_parents(client: MlflowClient, experiment_id: str, digest: str, exclude: str) -> list[str]:
    """Other parent runs whose source config and sweep path are these (newest first): they trained the same
    pre-trained models, so an experiment that changes only its methods, controls or downstream task need not
    train them again."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'experiment' and tags.`{SOURCE_TAG}` = '{digest}'",
                              order_by=["attributes.start_time DESC"], max_results=100)
    return [r.info.run_id for r in runs if r.info.run_id != exclude]


def key_of(result: dict) -> Key:
    return result["init"], int(result["pretrain_seed"]), int(result["seed"])


def finished_children(client: MlflowClient, experiment_id: str, parent_id: str) -> dict[Key, dict]:
    """The results already logged under ``parent_id``; children that never finished are deleted."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=50000)
    done: dict[Key, dict] = {}
    for run in runs:
        p, m = run.data.params, run.data.metrics
        if run.info.status != "FINISHED" or {"acc_head", "acc_full"} - set(m):
            log.info("deleting unfinished child run %s (%s)", run.info.run_id, run.info.run_name)
            client.delete_run(run.info.run_id)
            continue
        result = {"init": p["init"], "pretrain_seed": int(p["pretrain_seed"]), "seed": int(p["seed"]),
                  "acc_head": m["acc_head"], "acc_full": m["acc_full"], "wall_s": m.get("wall_s", float("nan"))}
        for name in RATES:
            rates = {float(k[len(name):]): v for k, v in m.items() if k.startswith(name)}
            if rates:
                result[name] = dict(sorted(rates.items()))
        done.setdefault(key_of(result), result)
    return done


def log_child(client: MlflowClient, experiment_id: str, parent_id: str, result: dict, desc: dict) -> str:
    """One finished fine-tune as a child run: parameters, final accuracies, per-epoch curves; FINISHED last,
    so a run that is FINISHED is complete."""
    init, pseed, seed = key_of(result)
    run = client.create_run(experiment_id, run_name=f"{init} p{pseed} s{seed}",
                            tags={"mlflow.parentRunId": parent_id, ROLE_TAG: "finetune"})
    rid = run.info.run_id
    now = int(time.time() * 1000)
    params = {**{k: str(v) for k, v in desc.items()}, "init": init, "pretrain_seed": str(pseed), "seed": str(seed)}
    metrics = [Metric(k, float(result[k]), now, 0) for k in ("acc_head", "acc_full", "wall_s")]
    metrics += [Metric(f"{name}{f:g}", float(v), now, 0) for name in RATES for f, v in result.get(name, {}).items()]
    metrics += [Metric(k, float(v), now, i + 1) for k in CURVES for i, v in enumerate(result.get(k, []))]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(rid, "FINISHED")
    return rid
