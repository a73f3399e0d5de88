"""The three image datasets of the mission, loaded once into memory as uint8 tensors.

Sweeps train many small models on the same data, so the whole set is read through torchvision once per
process and batches are cut from in-memory tensors (no DataLoader: nothing to fork, fully deterministic).
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets as tvd

from meta.errors import OblivionError

ENV_ROOT = "OBLIVION_DATA"


@dataclass(frozen=True)
class DatasetInfo:
    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str  # where torchvision expects the files under the data root
    files: tuple[str, ...]  # those files, relative to the root


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(1, 28, 10, (0.1307,), (0.3081,), "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
                          tuple(f"MNIST/raw/{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))),
    "fashionmnist": DatasetInfo(
        1, 28, 10, (0.2860,), (0.3530,), "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
        tuple(f"FashionMNIST/raw/{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")),
    ),
    "cifar10": DatasetInfo(
        3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        tuple(f"cifar-10-batches-py/{f}" for f in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]),
    ),
}


class DataError(OblivionError, RuntimeError):
    """A dataset that cannot be loaded; the message says where the files must go."""


@dataclass(frozen=True)
class DataSettings:
    """Where the data lives and how it may be loaded; travels from the driver to every worker."""

    root: str
    download: bool = False
    unverified_cifar10: bool = False  # accept a locally rebuilt CIFAR-10 whose md5s differ from torchvision's


def resolve_root(root: str | os.PathLike | None) -> str:
    """The data root from the flag, else $OBLIVION_DATA; an error naming both when neither is given."""
    root = root or os.environ.get(ENV_ROOT)
    if not root:
        raise DataError(f"no data root: pass --data-root DIR or set {ENV_ROOT}=DIR (see README, 'Data')")
    return str(Path(root).expanduser().resolve())


class _UnverifiedCIFAR10(tvd.CIFAR10):
    """CIFAR-10 from a local copy whose batch files do not match torchvision's md5 list.

    Used only when the user asks for it (``--unverified-cifar10``): the file layout and format are the
    official ones, only the checksums are skipped.
    """

    train_list = [[name, None] for name, _ in tvd.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in tvd.CIFAR10.test_list]
    meta = {**tvd.CIFAR10.meta, "md5": None}


@dataclass(frozen=True)
class Split:
    """Images as uint8 [N, C, H, W] and labels as int64 [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def _missing(name: str, root: str, why: str) -> DataError:
    info = DATASETS[name]
    return DataError(
        f"{name} not found or unreadable under {root} ({why}). Expected torchvision's layout: "
        f"{root}/{info.layout}. Unpack a local copy there (e.g. `make data`), or pass --download on a "
        f"machine with internet."
    )


def check_available(names: list[str], settings: DataSettings) -> None:
    """Fail fast, before any worker starts, if a dataset's files are not under the root (and no download)."""
    if settings.download:
        return
    problems = []
    for name in names:
        absent = [f for f in DATASETS[name].files if not (Path(settings.root) / f).is_file()]
        if absent:
            problems.append(str(_missing(name, settings.root, f"missing {', '.join(absent[:2])}{'…' if len(absent) > 2 else ''}")))
    if problems:
        raise DataError("\n".join(problems))


def preflight(names: list[str], settings: DataSettings) -> None:
    """Open every dataset in ``names`` (both splits) exactly as a worker will: the same loader and checksum rule,
    so a dataset the workers would refuse is refused here, before any Ray work. Frees what it loaded."""
    check_available(names, settings)
    problems = []
    for name in names:
        try:
            load(name, settings, True), load(name, settings, False)
        except DataError as e:
            problems.append(str(e))
    load.cache_clear()
    if problems:
        raise DataError("\n".join(problems))


@functools.lru_cache(maxsize=8)
def load(name: str, settings: DataSettings, train: bool) -> Split:
    """One split of a dataset, cached per process (a worker runs many sweeps on the same data)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    root = settings.root
    try:
        if name == "cifar10":
            cls = _UnverifiedCIFAR10 if settings.unverified_cifar10 else tvd.CIFAR10
            ds = cls(root, train=train, download=settings.download)
            x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
            y = torch.as_tensor(ds.targets, dtype=torch.int64)
        else:
            cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
            ds = cls(root, train=train, download=settings.download)
            x = ds.data.unsqueeze(1).contiguous()
            y = ds.targets.to(torch.int64)
    except RuntimeError as e:
        hint = ""
        present = all((Path(root) / f).is_file() for f in DATASETS[name].files)
        if name == "cifar10" and present and not settings.unverified_cifar10:
            hint = (
                " If this is a locally rebuilt copy (such as ../shared/data), its md5s cannot match torchvision's;"
                " load it anyway with --unverified-cifar10 (or `unverified_cifar10: true` under `data:`)."
            )
        raise DataError(str(_missing(name, root, str(e).strip())) + hint) from e
    except OSError as e:  # truncated or unreadable files
        raise _missing(name, root, f"{type(e).__name__}: {e}") from e
    info = DATASETS[name]
    if tuple(x.shape[1:]) != (info.channels, info.size, info.size) or x.dtype != torch.uint8:
        raise _missing(name, root, f"images have shape {tuple(x.shape[1:])} and dtype {x.dtype}")
    return Split(x, y)


def normalize(name: str, x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32, standardised per channel with the dataset's statistics."""
    info = DATASETS[name]
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - mean) / std


def main(argv: list[str] | None = None) -> int:
    """``python -m collectors.data --data-root DIR --download``: fetch the three datasets (needs internet)."""
    from meta import cli

    p = cli.Parser(prog="python -m collectors.data", description=main.__doc__)
    p.add_flag("--data-root", "--root", default=None, help=f"dataset root (default: ${ENV_ROOT})")
    p.add_argument("--download", action="store_true", help="download what is missing")
    p.add_argument("--unverified-cifar10", action="store_true", help="accept a locally rebuilt CIFAR-10 copy")
    args = p.parse_args(argv)
    try:
        settings = DataSettings(resolve_root(args.data_root), args.download, args.unverified_cifar10)
        for name in DATASETS:
            split = load(name, settings, True)
            print(f"{name}: {len(split)} training images under {settings.root}")
    except DataError as e:
        return cli.fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
