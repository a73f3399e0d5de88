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

from known.model import INPUT_MODES, KNOWN, InputMode
from known.predict import PREDICTED_KINDS
from known.tracking import tracking_uri

MODEL_NAME = "KNOWN"
ALIAS = "champion"
SHIPPED = Path(__file__).parent / "weights"


def save_dir(models: dict[str, KNOWN], directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for kind in PREDICTED_KINDS:
        tmp = directory / f".{kind}.safetensors.tmp"
        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in models[kind].state_dict().items()}, str(tmp),
                                    metadata={"inputs": models[kind].inputs})
        tmp.replace(directory / f"{kind}.safetensors")
    return directory


def load_dir(directory: str | Path) -> dict[str, KNOWN]:
    directory = Path(directory)
    models = {}
    for kind in PREDICTED_KINDS:
        path = directory / f"{kind}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"KNOWN weights missing: {path}")
        with safetensors.safe_open(str(path), "pt") as f:
            inputs = (f.metadata() or {}).get("inputs", "raw")
        if inputs not in INPUT_MODES:
            raise ValueError(f"{path}: unknown input mode {inputs!r} in its metadata (expected one of {list(INPUT_MODES)})")
        m = KNOWN(inputs=inputs)
        m.load_state_dict(safetensors.torch.load_file(str(path)))
        models[kind] = m.eval()
    return models


def load(uri: str | None = None, tracking: str | None = None) -> dict[str, KNOWN]:
    """KNOWN from ``models:/KNOWN@champion`` / ``models:/KNOWN/<version>``, a local folder, or the shipped one."""
    if uri is None:
        if not (SHIPPED / "PROVENANCE.json").is_file():
            raise FileNotFoundError(f"no shipped KNOWN in {SHIPPED} (PROVENANCE.json missing): pass a registry URI or a folder")
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


def ship(models: dict[str, KNOWN], provenance: dict, directory: Path = SHIPPED) -> Path:
    """Write ``models`` as the package's KNOWN with ``PROVENANCE.json`` (written last: weights without a
    provenance file are an unfinished ship)."""
    import json

    (directory / "PROVENANCE.json").unlink(missing_ok=True)
    save_dir(models, directory)
    tmp = directory / ".PROVENANCE.json.tmp"
    tmp.write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")
    tmp.replace(directory / "PROVENANCE.json")
    return directory


def main(argv: list[str] | None = None) -> int:
    """``python -m known.registry ship``: copy a registered or saved KNOWN into the package, with provenance."""
    import argparse
    import hashlib
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m known.registry", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("ship", help="make a KNOWN the one that ships in known/weights/")
    sp.add_argument("--model", required=True, help="models:/KNOWN@champion, models:/KNOWN/<version> or a folder")
    sp.add_argument("--shards", required=True, help="the meta-dataset it was trained on (its catalog is hashed)")
    sp.add_argument("--tracking-uri", default=None)
    sp.add_argument("--validation", nargs="*", default=[], metavar="FILE", help="JSON/markdown files of validation numbers to embed")
    sp.add_argument("--command", action="append", default=[], help="a command line that produced it (repeatable)")
    args = p.parse_args(argv)
    from meta import catalog, storage

    from mlflow.exceptions import MlflowException

    try:  # everything is read before anything is written: a bad input leaves the shipped KNOWN as it was
        models = load(args.model, args.tracking_uri)
        fs, path = storage.resolve(args.shards)
        with fs.open_input_file(storage.join(path, catalog.FILENAME)) as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        rows = catalog.read(args.shards)
        validation = {Path(v).name: (json.loads(Path(v).read_text()) if v.endswith(".json") else Path(v).read_text())
                      for v in args.validation}
    except (OSError, ValueError, MlflowException) as e:  # missing files / versions, unreadable catalog, bad JSON
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = [r for r in rows if r["status"] == "done"]
    counts: dict[str, int] = {}
    for r in done:
        counts[f"{r['family']}/{r['dataset']}"] = counts.get(f"{r['family']}/{r['dataset']}", 0) + 1
    provenance = {
        "model": args.model,
        "catalog_sha256": digest,
        "sweeps_done": len(done),
        "sweeps_failed": len(rows) - len(done),
        "sweeps_by_family_dataset": dict(sorted(counts.items())),
        "collection_cpu_hours": round(sum(r["wall_s"] for r in done) / 3600, 2),
        "commands": args.command,
        "validation": validation,
        "inputs": {k: m.inputs for k, m in models.items()},
    }
    out = ship(models, provenance)
    print(f"shipped KNOWN to {out} (trained on {len(done)} sweeps, catalog sha256 {digest[:12]}…)")
    return 0


def fresh(seed: int = 0, inputs: InputMode = "scaled") -> dict[str, KNOWN]:
    """Three newly initialised KNOWNs, reproducibly."""
    torch.manual_seed(seed)
    return {kind: KNOWN(inputs=inputs) for kind in PREDICTED_KINDS}


if __name__ == "__main__":
    raise SystemExit(main())
