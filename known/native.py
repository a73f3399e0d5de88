"""KNOWN's forward pass and L1 training step as fused C++ kernels (known/native.cpp), built on first use and
loaded with ctypes.

Why: torch runs KNOWN as a dozen small GEMMs (most with K <= 9, at 13-25% of a matmul's FLOP rate on the 2-core
VM) and elementwise passes over [64, rows] activations; the kernel takes each block of rows through the whole
network in SIMD registers, and the training step computes the loss and every parameter's gradient in the same
pass (numbers in docs/benchmarks.md). It is compiled with the machine's C++ compiler (``$CXX``, default g++; -O3
-march=native) into a cache keyed by the source, the flags, the compiler and the CPU, so a cluster of mixed
machines builds one per kind. Without a compiler, or with OBLIVION_NATIVE=0,
``library()`` is None and callers use torch (known/fast.py for prediction, autograd for training: the same
function, slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from meta import storage

log = logging.getLogger(__name__)
S = 5  # the kernel is compiled for KNOWN's five stages
SOURCE = Path(__file__).with_name("native.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
ENV_SWITCH = "OBLIVION_NATIVE"  # "0": never build or use the kernel


def cache_dir() -> Path:
    """Where built kernels live: $OBLIVION_CACHE/native, else ~/.cache/oblivion/native."""
    root = os.environ.get("OBLIVION_CACHE") or Path.home() / ".cache" / "oblivion"
    return Path(root) / "native"


def _cpu() -> str:
    """What -march=native compiles for: the machine and its CPU flags (Linux), else the processor name."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _build(cxx: str) -> Path:
    """The kernel's shared library, compiled unless this machine already has it (compiled in a scratch folder,
    then published by the one atomic writer: processes that build at once never load a half-written file)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"known-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        out = Path(scratch) / path.name
        run = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if run.returncode:
            raise OSError(f"{cxx} failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
        storage.write_atomic(*storage.resolve(str(path)), out.read_bytes())
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (logged once) where it cannot be built here."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    cxx = os.environ.get("CXX", "g++")
    try:
        if shutil.which(cxx) is None:
            raise OSError(f"no C++ compiler {cxx!r} on PATH")
        lib = ctypes.CDLL(str(_build(cxx)))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("KNOWN's native kernel is not available (%s): using the torch layout", e)
        return None
    lib.known_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.known_forward.restype = None
    lib.known_l1_grad.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.known_l1_grad.restype = ctypes.c_double
    return lib


def check_size(params: torch.Tensor, unfolded: bool) -> torch.Tensor:
    """``params`` if it has the length the kernel reads (its layout and this KNOWN's agree), else ValueError."""
    lib = library()
    want = lib.known_param_count_unfolded() if unfolded else lib.known_param_count()
    if len(params) != want:
        raise ValueError(f"the native kernel reads {want} parameters, this KNOWN packs {len(params)}")
    return params


def runs(x: torch.Tensor, model) -> bool:
    """Whether the kernel can take ``model`` (a KNOWN) on these network inputs: both float32 on the CPU, 5 stages,
    and the kernel built here."""
    return (model.n_stages == S and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, *model.parameters()))
            and library() is not None)


def forward(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """KNOWN's output for network inputs ``x`` [n, S], parameters packed by ``known.fast.NativeKNOWN``; [n]."""
    x = x.contiguous()
    out = torch.empty(len(x), dtype=torch.float32)
    library().known_forward(params.data_ptr(), x.data_ptr(), out.data_ptr(), len(x))  # ctypes releases the GIL
    return out


def _l1_grads(flats: list[torch.Tensor], x: torch.Tensor, t: torch.Tensor, counts: list[int], threads: int
              ) -> tuple[list[float], torch.Tensor]:
    """Per model k (rows of model k: the k-th run of ``counts`` rows): Σ|KNOWN_k(x) − t|, and the gradient of
    every model as one vector (model k's in the order of its parameters(), the models laid end to end). The
    rows are split evenly between ``threads`` threads, each with its own gradients and its models' runs in
    its share; the calling thread takes the first share."""
    edges = [len(x) * j // threads for j in range(threads + 1)]
    starts = [sum(counts[:k]) for k in range(len(counts) + 1)]
    offsets = [sum(len(f) for f in flats[:k]) for k in range(len(flats))]
    grads = torch.zeros(threads, sum(len(f) for f in flats), dtype=torch.float32)
    losses = torch.zeros(threads, len(flats), dtype=torch.float64)

    def part(j: int) -> None:
        for k, flat in enumerate(flats):
            lo, hi = max(edges[j], starts[k]), min(edges[j + 1], starts[k + 1])
            if hi > lo:
                losses[j, k] = library().known_l1_grad(flat.data_ptr(), x[lo:hi].data_ptr(), t[lo:hi].data_ptr(),
                                                       hi - lo, grads[j, offsets[k]:].data_ptr())  # ctypes releases the GIL

    others = [_pool(threads - 1).submit(part, j) for j in range(1, threads)]
    try:
        part(0)
    finally:  # never leave threads writing into buffers nobody waits for
        for f in others:
            f.result()
    return losses.sum(0).tolist(), grads[0] if threads == 1 else grads.sum(0)


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool kept for the process: starting threads at every step cost 1.3 of a 3.4 ms step (8,192 rows, 2 threads)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="known-native")


class _L1(torch.autograd.Function):
    """Each model's mean |KNOWN(x) − t| over its rows, the gradient in every model's parameters (one flat
    vector) from the same kernel pass, saved for backward."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, sizes: list[int], x: torch.Tensor, t: torch.Tensor, counts: list[int],
                threads: int) -> torch.Tensor:
        flats = [check_size(f, unfolded=True) for f in flat.detach().split(sizes)]
        threads = max(1, min(threads, len(x) // 1024))  # a thread per >= 1k rows
        losses, grad = _l1_grads(flats, x.contiguous(), t.contiguous(), counts, threads)
        for part, n in zip(grad.split(sizes), counts):  # the gradient of each model's mean loss
            part.div_(max(n, 1))
        ctx.grad, ctx.sizes = grad, sizes
        return torch.tensor([loss / max(n, 1) for loss, n in zip(losses, counts)])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        scaled = [part * g for part, g in zip(ctx.grad.split(ctx.sizes), grad_out.tolist())]
        return torch.cat(scaled), None, None, None, None, None


def l1(flat: torch.Tensor, sizes: list[int], x: torch.Tensor, t: torch.Tensor, counts: list[int], threads: int = 1
       ) -> torch.Tensor:
    """[len(sizes)]: model k's mean |KNOWN_k(x) − t| over its rows. ``flat``: every model's parameters laid end to
    end, model k's ``sizes[k]`` in the order of its parameters(); the rows of ``x`` [n, S] (network inputs) and
    ``t`` [n] come grouped by model, ``counts[k]`` rows each. Differentiable in ``flat``; forward and backward
    in one pass of the kernel on ``threads`` threads (check ``runs`` for each model first)."""
    return _L1.apply(flat, list(sizes), x, t.float(), list(counts), threads)
