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


def use_tracking(flag: str | None, experiment: str) -> str:
    """Point MLflow at the tracking store (see ``tracking_uri``) and experiment; returns the URI."""
    import mlflow

    uri = tracking_uri(flag)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    mlflow.set_experiment_tag("mlflow.experimentKind", "custom_model_development")  # the UI opens on runs, not GenAI
    return uri
