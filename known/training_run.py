"""A meta-training's MLflow run: found again by a resumed training (its id is kept next to Ray Train's
checkpoints), and the meta-dataset recorded as its input with the lineage a registered version carries."""

from __future__ import annotations

import hashlib
import json
import logging

from known import registry
from meta import storage

RUN_FILE = "mlflow_run.json"  # next to Ray Train's checkpoints: the MLflow run a resumed training continues
log = logging.getLogger(__name__)


def validation_digest(val_ids: set[str]) -> str:
    """The validation set's identity: numbers measured on sets with other digests are not compared."""
    return hashlib.sha256("\n".join(sorted(val_ids)).encode()).hexdigest()


def _run_file(args) -> tuple:
    fs, path = storage.resolve(storage.join(storage.normalize(args.storage), args.name, RUN_FILE))
    return fs, path


def stored_run_id(args) -> str | None:
    """The MLflow run of an earlier training under the same --storage / --name, which a resume continues."""
    fs, path = _run_file(args)
    if not storage.exists(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())["run_id"]


def store_run_id(args, run_id: str) -> None:
    fs, path = _run_file(args)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    storage.write_atomic(fs, path, json.dumps({"run_id": run_id}).encode())


def log_lineage(args, rows: list[dict], train_ids: set[str], val_ids: set[str]) -> dict[str, str]:
    """Record the meta-dataset as the run's MLflow dataset input; returns the lineage tags of the model version."""
    import mlflow
    import pandas as pd

    digest = registry.catalog_sha256(args.collection)
    used = [r for r in rows if r["sweep_id"] in train_ids | val_ids]
    df = pd.DataFrame({"sweep_id": [r["sweep_id"] for r in used], "family": [r["family"] for r in used],
                       "dataset": [r["dataset"] for r in used],
                       "split": ["validation" if r["sweep_id"] in val_ids else "train" for r in used]})
    mlflow.log_input(mlflow.data.from_pandas(df, source=storage.normalize(args.collection), name="meta-dataset",
                                             digest=digest[:32]), context="training", tags={"catalog_sha256": digest})
    mlflow.log_dict({split: registry.by_family_dataset([r for r in used if (r["sweep_id"] in val_ids) == (split == "validation")])
                     for split in ("train", "validation")}, "sweeps_by_family_dataset.json")
    return {"catalog_sha256": digest, registry.VAL_DIGEST: validation_digest(val_ids), "shards": args.collection}


def start_run(args):
    """A new MLflow run, or the one an earlier training under the same --storage / --name started."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = stored_run_id(args)
    if run_id:
        try:
            return mlflow.start_run(run_id=run_id, log_system_metrics=args.system_metrics), True
        except MlflowException as e:
            log.warning("run %s of %s/%s not in this tracking store (%s): starting a new one", run_id, args.storage, args.name, e)
    run = mlflow.start_run(run_name=args.name, log_system_metrics=args.system_metrics)
    store_run_id(args, run.info.run_id)
    return run, False
