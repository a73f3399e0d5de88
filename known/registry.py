"""Saving, publishing and fetching KNOWN: safetensors on disk, versions in the MLflow model registry.

A KNOWN "model" is three hyper-models (conv, linear, bias), stored as ``conv.safetensors``,
``linear.safetensors`` and ``bias.safetensors`` in one folder: no pickle is needed to load them.
Published versions are MLflow logged models registered under the name ``KNOWN``; the alias ``champion``
moves to a new version only if it beats the champion on validation.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch

from known.model import KNOWN
from known.predict import PREDICTED_KINDS

MODEL_NAME = "KNOWN"
ALIAS = "champion"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SHIPPED = Path(__file__).parent / "weights"


def tracking_uri(flag: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else a local sqlite store in the working folder."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def save_dir(models: dict[str, KNOWN], directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for kind in PREDICTED_KINDS:
        tmp = directory / f".{kind}.safetensors.tmp"
        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in models[kind].state_dict().items()}, str(tmp))
        tmp.replace(directory / f"{kind}.safetensors")
    return directory


def load_dir(directory: str | Path) -> dict[str, KNOWN]:
    directory = Path(directory)
    models = {}
    for kind in PREDICTED_KINDS:
        path = directory / f"{kind}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"KNOWN weights missing: {path}")
        m = KNOWN()
        m.load_state_dict(safetensors.torch.load_file(str(path)))
        models[kind] = m.eval()
    return models


def load(uri: str | None = None, tracking: str | None = None) -> dict[str, KNOWN]:
    """KNOWN from ``models:/KNOWN@champion`` / ``models:/KNOWN/<version>``, a local folder, or the shipped one."""
    if uri is None:
        if not (SHIPPED / "conv.safetensors").is_file():
            raise FileNotFoundError("this version ships no KNOWN weights yet: pass a registry URI or a folder")
        return load_dir(SHIPPED)
    if not uri.startswith("models:/"):
        return load_dir(uri)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(tracking))
    return load_dir(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def publish(models: dict[str, KNOWN], metric: str, value: float, tracking: str | None = None) -> tuple[str, bool]:
    """Log ``models`` in the active MLflow run, register a new version of KNOWN, and move the champion alias
    to it if ``value`` (lower is better) beats the champion's. Returns (version, became_champion)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri(tracking))
    client = MlflowClient()
    logged = mlflow.initialize_logged_model(name="known")
    with tempfile.TemporaryDirectory() as d:
        client.log_model_artifacts(logged.model_id, str(save_dir(models, d)))
    mlflow.finalize_logged_model(logged.model_id, "READY")
    version = mlflow.register_model(f"models:/{logged.model_id}", MODEL_NAME, tags={metric: str(value)}).version
    try:
        champion = client.get_model_version_by_alias(MODEL_NAME, ALIAS)
        best = float(champion.tags.get(metric, "inf"))
    except MlflowException:  # no champion yet
        best = float("inf")
    better = value < best
    if better:
        client.set_registered_model_alias(MODEL_NAME, ALIAS, version)
    return str(version), better


def fresh(seed: int = 0) -> dict[str, KNOWN]:
    """Three newly initialised KNOWNs, reproducibly."""
    torch.manual_seed(seed)
    return {kind: KNOWN() for kind in PREDICTED_KINDS}
