"""Tiny, learnable stand-ins for MNIST, FashionMNIST and CIFAR-10, written in torchvision's on-disk formats.

Class c is a bright 6×6 patch at a class-specific place on noise, so a small model learns it in a few
steps and forgetting tests can see accuracy move.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def _images(n: int, channels: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 10, n)
    x = rng.integers(0, 90, (n, channels, size, size), dtype=np.uint8)
    for i, c in enumerate(y):
        r, col = 2 + (c // 5) * 12, 2 + (c % 5) * 5
        x[i, :, r : r + 6, col : col + 6] = 230
    return x, y.astype(np.uint8)


def write_idx(root: Path, name: str, n_train: int = 256, n_test: int = 128, seed: int = 0) -> None:
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = _images(n, 1, 28, rng)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28) + x.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + y.tobytes())


def write_cifar(root: Path, n_per_batch: int = 64, n_test: int = 128, seed: int = 0) -> None:
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        x, y = _images(n_test if name == "test_batch" else n_per_batch, 3, 32, rng)
        with open(d / name, "wb") as f:  # our own file, in the official layout torchvision reads
            pickle.dump({"data": x.reshape(len(x), -1), "labels": y.tolist()}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def write_all(root: Path) -> Path:
    write_idx(root, "MNIST")
    write_idx(root, "FashionMNIST", seed=1)
    write_cifar(root, seed=2)
    return Path(root)
