"""What a registered KNOWN needs to predict: its safetensors folder and windows in, predictions out.

Logged with every pyfunc version as its code (MLflow ``code_paths``, see ``known.registry.publish``) together
with ``known/model.py`` and a package ``__init__`` holding ``KnownError`` (``known.registry.PYFUNC_INIT``), under
another package name, so that a version loads where
this repository is not installed. Hence relative imports only, and nothing beyond torch, safetensors and numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from . import KnownError
from .model import INPUT_MODES, KNOWN, PREDICTED_KINDS, S

WINDOW_COLUMNS = (*(f"w{i}" for i in range(S)), "rms", "kind")


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
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                inputs = (f.metadata() or {}).get("inputs", "raw")
            if inputs not in INPUT_MODES:
                raise KnownError(f"{path}: unknown input mode {inputs!r} in its metadata (expected one of {list(INPUT_MODES)})")
            m = KNOWN(inputs=inputs)
            m.load_state_dict(safetensors.torch.load_file(str(path)))
        except (safetensors.SafetensorError, RuntimeError) as e:  # not safetensors, or not a KNOWN's tensors
            raise KnownError(f"{path} does not hold a KNOWN's weights: {str(e).splitlines()[0]}") from None
        models[kind] = m.eval()
    return models


def predict_windows(models: dict[str, KNOWN], windows) -> np.ndarray:
    """The pyfunc's ``predict``: one predicted value (the stage before the most-data one) per row of ``windows``,
    a DataFrame with ``WINDOW_COLUMNS``: the S stage values of one scalar, least data first (w0) to most data
    (w4), as KNOWN reads them; ``rms``, its tensor's RMS at the most-data stage (used by ``rms`` KNOWNs); and
    ``kind``, conv / linear / bias (which KNOWN)."""
    missing = [c for c in WINDOW_COLUMNS if c not in windows]
    if missing:
        raise KnownError(f"windows lack the columns {missing}; expected {list(WINDOW_COLUMNS)}")
    bad = sorted(set(windows["kind"]) - set(models))
    if bad:
        raise KnownError(f"windows of unknown kinds {bad}; KNOWN predicts {sorted(models)}")
    w = torch.as_tensor(windows[list(WINDOW_COLUMNS[:S])].to_numpy(np.float32, copy=True))
    rms = torch.as_tensor(windows["rms"].to_numpy(np.float32, copy=True))
    kind = windows["kind"].to_numpy()
    out = np.empty(len(w), np.float32)
    with torch.inference_mode():
        for k, m in models.items():
            rows = np.flatnonzero(kind == k)
            if len(rows):
                out[rows] = m.step(w[rows], rms[rows]).numpy()
    return out
