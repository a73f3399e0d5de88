"""Where MLflow lives: one rule for every CLI (train, registry, evaluation, report). Torch-free, so tools that
only read runs do not import the training stack."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(flag: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else a local sqlite store in the working folder.

    A relative sqlite path is made absolute: Ray workers run in other folders and would open another file."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def existing_store(flag: str | None = None, reading: str = "runs") -> str:
    """``tracking_uri`` for reading ``reading``: a local store that does not exist is refused, since MLflow would
    create an empty one (an mlflow.db in the working folder) only to report the model or run missing from it."""
    from meta.storage import StorageError

    uri = tracking_uri(flag)
    scheme, sep, rest = uri.partition("://")
    local = rest[1:] if scheme == "sqlite" else rest if scheme == "file" else None if sep else uri
    if local is not None and not Path(local).exists():
        raise StorageError(f"cannot read {reading}: no MLflow tracking store at {uri}; pass --tracking-uri URI or set "
                         "MLFLOW_TRACKING_URI")
    return uri


def use_tracking(flag: str | None, experiment: str) -> str:
    """Point MLflow at the tracking store (see ``tracking_uri``) and experiment; returns the URI."""
    import mlflow

    uri = tracking_uri(flag)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    mlflow.set_experiment_tag("mlflow.experimentKind", "custom_model_development")  # the UI opens on runs, not GenAI
    return uri
