"""Import the authors' released KNOWN weights (Keras HDF5: KNOWN_Conv.h5, KNOWN_FC.h5, KNOWN_Bias.h5).

The files are not ours to ship: a user points us at them. Keras Dense kernels are [in, out] and are
transposed for torch. Layer names follow the order in which the official code creates the layers:
dense … dense_5 are the values stream, dense_6 … dense_11 the differences stream, dense_12 the head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from known import KnownError
from known.model import KNOWN

FILES = {"conv": "KNOWN_Conv.h5", "linear": "KNOWN_FC.h5", "bias": "KNOWN_Bias.h5"}
_STREAM = ("inp", "squeeze", "base", "gate", "rate", "out")  # dense_{0..5} / dense_{6..11}


def layer_map() -> dict[str, str]:
    """Keras layer name -> torch module path in ``KNOWN``."""
    names = {}
    for i, part in enumerate(_STREAM):
        names["dense" if i == 0 else f"dense_{i}"] = f"values.{part}"
        names[f"dense_{i + 6}"] = f"diffs.{part}"
    names["dense_12"] = "head"
    return names


def load_h5(path: str | Path) -> KNOWN:
    """One official KNOWN from its .h5 file; an error names the file and the layer that does not fit."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official KNOWN weights not found: {path}")
    model = KNOWN(inputs="raw")  # the official model reads raw values
    state = {}
    with h5py.File(path, "r") as f:
        for keras_name, torch_name in layer_map().items():
            if keras_name not in f:
                raise KnownError(f"{path}: layer {keras_name!r} missing; is this a KNOWN weight file?")
            group = f[keras_name][keras_name] if keras_name in f[keras_name] else f[keras_name]
            if "kernel:0" not in group or "bias:0" not in group:
                raise KnownError(f"{path}: layer {keras_name!r} lacks kernel:0 / bias:0")
            kernel = np.asarray(group["kernel:0"], dtype=np.float32)
            bias = np.asarray(group["bias:0"], dtype=np.float32)
            state[f"{torch_name}.weight"] = torch.from_numpy(kernel.T.copy())
            state[f"{torch_name}.bias"] = torch.from_numpy(bias)
    expected = model.state_dict()
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise KnownError(f"{path}: {k} has shape {tuple(v.shape)}, KNOWN expects {tuple(expected[k].shape)}")
    model.load_state_dict(state)
    return model.eval()


def load_dir(directory: str | Path) -> dict[str, KNOWN]:
    """The three official models (conv, linear, bias) from a folder holding the released files."""
    return {kind: load_h5(Path(directory) / name) for kind, name in FILES.items()}
