"""Saving, publishing and fetching KNOWN: safetensors on disk, versions in the MLflow model registry.

A KNOWN "model" is three hyper-models (conv, linear, bias), stored as ``conv.safetensors``,
``linear.safetensors`` and ``bias.safetensors`` in one folder: no pickle is needed to load them.
Published versions are MLflow pyfunc models (``known/pyfunc_model.py``, carrying ``known.serving`` and what it
imports as their code, an input example and a signature: they load where this repository is not installed)
registered under the name ``KNOWN``, tagged with their validation metric and lineage (catalog and validation-set
sha256). The alias ``champion``
moves to a new version only if it beats the champion on the same validation set: when the sets differ the
champion is re-validated on the challenger's (``known.train`` does), and without that it stays.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from known import KnownError, baselines
from known.model import DEFAULT_INPUTS, KNOWN, PREDICTED_KINDS, InputMode
from known.serving import WINDOW_COLUMNS, load_dir, predict_windows, save_dir  # noqa: F401 (also as registry.*:
# the callers, and the versions registered before known.serving, whose pyfunc calls registry.load_dir)
from meta.errors import OblivionError
from meta.tracking import existing_store, tracking_uri

MODEL_NAME = "KNOWN"
ALIAS = "champion"
SHIPPED = Path(__file__).parent / "weights"
WEIGHTS = "artifacts/weights"  # where a pyfunc version keeps the safetensors (the folder's name is kept)
METRIC = "val_rel_l1"  # Σ|Θ̂k − Θk| / Σ|Θk+1 − Θk| over all validation scalars: < 1 beats "no change"
VAL_DIGEST = "validation_sha256"  # model-version tag: the validation set METRIC was measured on
# a pyfunc version carries the modules known/pyfunc_model.py imports (known.serving and what it imports) as a
# package of this name: not "known", which would shadow an installed known in the process that loads it
PYFUNC_PACKAGE, PYFUNC_CODE = "known_pyfunc", ("model.py", "serving.py")
# the package's __init__: known/__init__.py's error without the project's base (meta is not logged with a version)
PYFUNC_INIT = ('"""KNOWN\'s serving code as logged with a registered version (known.registry)."""\n\n\n'
               'class KnownError(ValueError):\n    """A bad input to the served KNOWN, named in one line."""\n')


def load_predictor(method: str = "known", source: str | None = None, tracking: str | None = None) -> dict[str, KNOWN] | None:
    """The predictor of ``method`` (kind -> KNOWN), or None for a baseline, which needs none: the one loader
    that prediction, validation, the predictability report and the evaluation share.

    ``known``: ``source`` None is the shipped KNOWN; ``models:/KNOWN@champion`` / ``models:/KNOWN/<version>`` comes
    from the registry at ``tracking`` (see ``tracking_uri``); anything else is a folder of safetensors.
    ``known-official``: ``source`` is the folder with the authors' KNOWN_*.h5 files."""
    if method in baselines.METHODS:
        return None
    if method == "known-official":
        if not source:
            raise KnownError("method 'known-official' needs the folder with the authors' KNOWN_*.h5 files")
        from known import official

        return official.load_dir(source)
    if method != "known":
        raise KnownError(f"unknown method {method!r}; known: {['known', 'known-official', *baselines.METHODS]}")
    if source is None:
        if not (SHIPPED / "PROVENANCE.json").is_file():
            raise FileNotFoundError(f"no shipped KNOWN in {SHIPPED} (PROVENANCE.json missing): pass a registry URI or a folder")
        return load_dir(SHIPPED)
    if source.startswith("models:/"):
        return load_dir(_download(source, tracking))
    return load_dir(source)


def _download(uri: str, tracking: str | None) -> Path:
    """The local folder of a registered KNOWN's weights; a missing model, version or alias is one KnownError."""
    store = existing_store(tracking, uri)  # before importing mlflow: a missing store is refused in a moment
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(store)
    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as e:
        raise KnownError(f"{uri} not found in the registry at {store}: {e.message.splitlines()[0]}") from None
    return root / WEIGHTS if (root / WEIGHTS).is_dir() else root  # pyfunc versions keep them under artifacts/


def champion_decision(value: float, val_digest: str, champion: dict[str, str] | None,
                      revalidate: Callable[[], float] | None) -> tuple[bool, str]:
    """(move the alias, why). Numbers from different validation sets are not compared: the champion is
    re-validated on the challenger's set (``revalidate``: the champion's metric there), or, without a way to
    re-validate, it stays."""
    if champion is None:
        return True, "no champion yet"
    if champion.get(VAL_DIGEST) == val_digest:
        best = float(champion.get(METRIC, "inf"))
        return value < best, f"same validation set: {value:.6g} vs champion {best:.6g}"
    if revalidate is None:
        return False, "champion validated on another set and cannot be re-validated here: not compared"
    best = revalidate()
    return value < best, f"champion re-validated on this validation set: {value:.6g} vs {best:.6g}"


def publish(models: dict[str, KNOWN], value: float, lineage: dict[str, str], tracking: str | None = None,
            revalidate: Callable[[dict[str, KNOWN]], float] | None = None) -> tuple[str, bool, str]:
    """Log ``models`` in the active MLflow run as a pyfunc model, register it as a new version of KNOWN tagged
    with ``METRIC`` = ``value`` (lower is better) and ``lineage`` (``VAL_DIGEST`` at least), and move the champion
    alias per ``champion_decision``. Returns (version, became champion, why)."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri(tracking))
    client = MlflowClient()
    example = pd.DataFrame({"w0": [0.10, 0.02], "w1": [0.11, 0.021], "w2": [0.12, 0.023], "w3": [0.125, 0.026],
                            "w4": [0.13, 0.03], "rms": [0.1, 0.03], "kind": ["conv", "bias"]})
    with tempfile.TemporaryDirectory() as d:
        code = Path(d) / PYFUNC_PACKAGE
        code.mkdir()
        for name in PYFUNC_CODE:
            shutil.copyfile(Path(__file__).with_name(name), code / name)
        (code / "__init__.py").write_text(PYFUNC_INIT)
        info = mlflow.pyfunc.log_model(name="known", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                                       artifacts={"weights": str(save_dir(models, Path(d) / "weights"))},
                                       code_paths=[str(code)], input_example=example,
                                       signature=infer_signature(example, predict_windows(models, example)),
                                       pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "pandas", "numpy"])
    version = mlflow.register_model(info.model_uri, MODEL_NAME, tags={METRIC: str(value), **lineage}).version
    try:
        champion = client.get_model_version_by_alias(MODEL_NAME, ALIAS)
    except MlflowException:  # no champion yet
        champion = None
    check = (lambda: revalidate(load_predictor("known", f"models:/{MODEL_NAME}/{champion.version}", tracking))) if revalidate else None
    move, why = champion_decision(value, lineage[VAL_DIGEST], champion and champion.tags, check)
    if move:
        client.set_registered_model_alias(MODEL_NAME, ALIAS, version)
    return str(version), move, why


def ship(models: dict[str, KNOWN], provenance: dict, directory: Path) -> Path:
    """Write ``models`` with ``PROVENANCE.json`` into ``directory`` (the repository's is ``SHIPPED``); the
    provenance is written last: weights without it are an unfinished ship, which ``load_predictor`` refuses."""
    import json

    from meta import storage

    (directory / "PROVENANCE.json").unlink(missing_ok=True)
    save_dir(models, directory)
    storage.write_atomic(*storage.resolve(str(directory / "PROVENANCE.json")),
                         (json.dumps(provenance, indent=1, sort_keys=True) + "\n").encode())
    return directory


def main(argv: list[str] | None = None) -> int:
    """``python -m known.registry ship``: write a registered or saved KNOWN, with its provenance, to a folder
    (the repository's shipped KNOWN is known/weights/: ``--out known/weights`` in a checkout)."""
    from meta import cli

    p = cli.Parser(prog="python -m known.registry", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("ship", help="write a KNOWN with its provenance to a folder (the repository ships known/weights/)")
    sp.add_argument("--model", required=True, help="models:/KNOWN@champion, models:/KNOWN/<version> or a folder")
    cli.add_collection(sp, "--shards", required=True, help="the collection it was trained on (its catalog is hashed)")
    sp.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of models:/ (default $MLFLOW_TRACKING_URI "
                    "or sqlite:///mlflow.db)")
    sp.add_argument("--validation", nargs="*", default=[], metavar="FILE", help="JSON/markdown files of validation numbers to embed")
    sp.add_argument("--command", action="append", default=[], help="a command line that produced it (repeatable)")
    sp.add_argument("--out", required=True, metavar="DIR", help="the folder to write (created if missing; "
                    "known/weights in a checkout to replace the repository's shipped KNOWN)")
    args = p.parse_args(argv)
    from mlflow.exceptions import MlflowException

    from meta import catalog, storage

    try:  # everything is read before anything is written: a bad input leaves the shipped KNOWN as it was
        storage.check_output(args.out, folder=True, flag="--out")
        cli.require_collection(args.collection)
        digest = catalog_sha256(args.collection)
        rows = catalog.read(args.collection)
        validation = {Path(v).name: validation_file(v) for v in args.validation}
        models = load_predictor("known", args.model, args.tracking_uri)
    except (OblivionError, OSError, MlflowException) as e:  # missing files / versions, an unreadable catalog
        return cli.fail(e)
    done = [r for r in rows if r["status"] == "done"]
    provenance = {
        "model": args.model,
        "catalog_sha256": digest,
        "sweeps_done": len(done),
        "sweeps_failed": len(rows) - len(done),
        "sweeps_by_family_dataset": by_family_dataset(done),
        "collection_cpu_hours": round(sum(r["wall_s"] for r in done) / 3600, 2),
        "commands": args.command,
        "validation": validation,
        "inputs": {k: m.inputs for k, m in models.items()},
        "protocol": protocol_of(done),
    }
    out = ship(models, provenance, Path(args.out))
    print(f"shipped KNOWN to {out} (trained on {len(done)} sweeps, catalog sha256 {digest[:12]}…)")
    return 0


def validation_file(path: str) -> dict | str:
    """A file of validation numbers as ``ship`` embeds it: parsed JSON, or the text of anything else."""
    import json

    try:
        text = Path(path).read_text()
        return json.loads(text) if path.endswith(".json") else text
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KnownError(f"--validation {path} is not {'JSON' if path.endswith('.json') else 'text'}: {e}") from None


def catalog_sha256(shards: str) -> str:
    """The digest of a meta-dataset's catalog: which sweeps, in which shards, with which hashes (lineage)."""
    from meta import catalog

    return catalog.digest(shards)


def by_family_dataset(rows: list[dict]) -> dict[str, int]:
    """Sweeps per "family/dataset", sorted: what a KNOWN was trained on, at a glance."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[f"{r['family']}/{r['dataset']}"] = counts.get(f"{r['family']}/{r['dataset']}", 0) + 1
    return dict(sorted(counts.items()))


def protocol_of(rows: list[dict]) -> dict:
    """The sweep protocol a KNOWN was meta-trained on, per field (a list where the catalog mixes values): the
    evaluation compares its own sweep with it. ``stage_epochs`` reads "pretrain" where stages are as long as Θ0's."""
    from meta.record import LEGACY_PROTOCOL

    out = {}
    for field in LEGACY_PROTOCOL:
        values = sorted({r.get(field) or LEGACY_PROTOCOL[field] for r in rows})
        out[field] = values[0] if len(values) == 1 else values
    epochs = sorted({"pretrain" if r["stage_epochs"] == r["pretrain_epochs"] else r["stage_epochs"] for r in rows}, key=str)
    out["stage_epochs"] = epochs[0] if len(epochs) == 1 else epochs
    for field in ("train_size", "pretrain_epochs", "r", "lr"):  # the scale: one value, or the [low, high] sampled
        values = [r[field] for r in rows if r.get(field) is not None]
        if values:
            out[field] = values[0] if min(values) == max(values) else [min(values), max(values)]
    return out


def fresh(seed: int = 0, inputs: InputMode = DEFAULT_INPUTS) -> dict[str, KNOWN]:
    """Three newly initialised KNOWNs, reproducibly."""
    torch.manual_seed(seed)
    return {kind: KNOWN(inputs=inputs) for kind in PREDICTED_KINDS}


if __name__ == "__main__":
    raise SystemExit(main())
