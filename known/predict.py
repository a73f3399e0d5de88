"""KNOW prediction: step a model's forgetting trajectory back, Θ-1, Θ-2, … ("×1/r", "×1/r²", …).

``retrodict(stages, steps, method)`` takes S=5 state dicts ordered from the most-data stage Θ0 to the
least-data stage Θ4 and returns the predicted state dicts, each loadable into the original architecture.
Each prediction shifts into the window for the next one. Tensors are grouped by kind (conv kernels,
linear kernels, biases), flattened into one [N, S] matrix per kind and pushed through the predictor in
bounded chunks: one batched call per chunk instead of a loop over layers.
"""

from __future__ import annotations

import functools
import pickle
import sys
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import safetensors.torch
import torch
from torch import nn

from collectors import data, zoo

from known import KnownError, baselines, native, registry
from known.fast import FastKNOWN, NativeKNOWN
from known.model import PREDICTED_KINDS, S, KNOWN, segment_rms
from meta import cli, storage
from meta.errors import OblivionError

METHODS = ("known", "known-official", *baselines.METHODS)


class PredictError(KnownError):
    """Stages that cannot be retrodicted; the message names the stage and tensor."""


class Stepper(Protocol):
    """One KNOW step over many windows: every implementation of KNOWN (``choose``) and every baseline
    (``baselines.Baseline``) is one, and ``stepper`` hands out the one that runs."""

    CHUNK: int  # rows per call by default on the CPU

    def to(self, device) -> Stepper: ...

    def step(self, w: torch.Tensor, rms: torch.Tensor | None, chunk: int, threads: int = 1) -> torch.Tensor:
        """The next value (one stage more data) of every row of ``w`` [N, S] (least data first); ``rms``: each row's
        tensor's RMS at the newest stage where the model reads it; ``chunk`` rows at a time on ``threads``."""


def infer_kinds(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Kinds from names and shapes, for state dicts that come without a model or a sweep record; the same
    decisions as ``collectors.zoo.tensor_kinds`` makes from the modules (attention projections, positional
    tables, class tokens), except that an nn.Embedding's weight reads as a linear kernel: pass ``kinds``
    for models with token embeddings."""
    kinds = {}
    for name, t in state.items():
        owner, _, leaf = name.rpartition(".")
        weight = state.get(f"{owner}.weight" if owner else "weight")
        if not t.is_floating_point() or leaf.startswith("running_") or leaf == "num_batches_tracked":
            kinds[name] = "buffer"
        elif leaf in zoo.ATTENTION_KINDS:
            kinds[name] = zoo.ATTENTION_KINDS[leaf]
        elif leaf in zoo.EMBEDDING_PARAMS:
            kinds[name] = "embedding"
        elif t.dim() >= 3:
            kinds[name] = "conv"
        elif t.dim() == 2:
            kinds[name] = "linear"
        elif leaf == "bias" and weight is not None and weight.dim() >= 2:
            kinds[name] = "bias"
        else:
            kinds[name] = "norm"
    return kinds


def _validate(stages: Sequence[Mapping[str, torch.Tensor]]) -> None:
    if len(stages) != S:
        raise PredictError(f"need exactly {S} stages (Θ0 most data … Θ{S - 1} least data), got {len(stages)}")
    ref = stages[0]
    for k, st in enumerate(stages):
        if set(st) != set(ref):
            diff = sorted(set(st) ^ set(ref))
            raise PredictError(f"stage {k} has different tensors than stage 0: {diff[:5]}")
        for name, t in st.items():
            if t.shape != ref[name].shape:
                raise PredictError(f"stage {k}: {name} has shape {tuple(t.shape)}, stage 0 has {tuple(ref[name].shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise PredictError(f"stage {k}: {name} contains NaN or inf")


def _step(window: torch.Tensor, method: str, model: KNOWN | None, chunk: int | None, sizes: list[int],
          threads: int | None = None) -> torch.Tensor:
    """Next value of every row of ``window`` [N, S] (least data first); ``sizes``: the tensors laid end to end in it.
    ``threads``: chunks in parallel (default: torch's intra-op threads on CPU, 1 on CUDA); ``chunk`` None: the
    stepper's default."""
    step, default = stepper(method if method in baselines.METHODS else model, window)
    rms = segment_rms(window[:, -1], sizes) if model is not None and model.inputs == "rms" else None
    if threads is None:
        threads = 1 if window.is_cuda else torch.get_num_threads()
    return step.step(window, rms, chunk or default, threads)


def stepper(model: KNOWN | str, window: torch.Tensor) -> tuple[Stepper, int]:
    """The step that runs for windows like ``window`` and its default chunk: a baseline's for a baseline's name,
    else ``layout``'s choice built for ``model`` on their device. Prediction, meta-training's validation and the
    predictability report all ask here."""
    if isinstance(model, str):
        return baselines.Baseline(model), baselines.Baseline.CHUNK
    chosen = layout(window, model)
    return chosen(model).to(window.device), default_chunk(chosen, window)


def choose(device: str, dtype: torch.dtype | None, n_stages: int, native_available: bool, triton_available: bool):
    """The KNOW step's implementation, chosen here and nowhere else (a pure function, tested case by case):

    | where | what runs |
    |---|---|
    | CPU, float32, 5 stages, a C++ compiler here | ``NativeKNOWN``: the fused C++ kernel (known/native.cpp) |
    | CUDA, float32, 5 stages, Triton installed | ``TritonKNOWN``: the Triton kernel (known/gpu.py) |
    | anything else (float64, other stage counts, no compiler, no Triton) | ``FastKNOWN``: the torch layout |

    Each implements ``step(w, rms, chunk, threads)`` and is tested against ``KNOWN.step``, the reference (which
    the registered pyfunc runs: it must load without this repository's kernels). ``dtype`` None: the windows
    and the model disagree."""
    if device == "cpu" and _exact(dtype, n_stages) and native_available:
        return NativeKNOWN
    if device == "cuda" and _exact(dtype, n_stages) and triton_available:
        from known.gpu import TritonKNOWN

        return TritonKNOWN
    return FastKNOWN


def _exact(dtype: torch.dtype | None, n_stages: int) -> bool:
    """What the kernels are built for: float32 windows of five stages."""
    return dtype == torch.float32 and n_stages == S


@functools.cache  # asked on every training step on CUDA: a failed import is not cached by Python
def _triton_available() -> bool:
    try:
        import known.gpu  # noqa: F401
    except ImportError:  # a CUDA torch without Triton
        return False
    return True


def layout(window: torch.Tensor, model: KNOWN):
    """``choose`` for these windows and this model (the kernel is built on first use where it can be)."""
    same = all(p.device == window.device and p.dtype == window.dtype for p in model.parameters())
    device, dtype = window.device.type, window.dtype if same else None
    kernel = _exact(dtype, model.n_stages)  # the kernels are built (a compile, once) only where one could run
    return choose(device, dtype, model.n_stages,
                  native_available=device == "cpu" and kernel and native.library() is not None,
                  triton_available=device == "cuda" and kernel and _triton_available())


def default_chunk(chosen, window: torch.Tensor) -> int:
    """The layout ``chosen``'s default chunk for these windows: its CUDA chunk where it has one and they are on the
    GPU."""
    return getattr(chosen, "CUDA_CHUNK", chosen.CHUNK) if window.is_cuda else chosen.CHUNK


def retrodict(
    stages: Sequence[Mapping[str, torch.Tensor]],
    steps: int = 3,
    method: str = "known",
    *,
    models: Mapping[str, KNOWN] | None = None,
    kinds: Mapping[str, str] | None = None,
    chunk: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Predicted state dicts Θ-1 … Θ-steps from ``stages`` = [Θ0 (most data), …, Θ4 (least data)].

    ``models`` maps conv / linear / bias to a KNOWN; without it, method ``known`` uses the shipped KNOWN.
    Tensors of other kinds (norm affine parameters, embeddings, buffers) are copied from Θ0.
    ``chunk``: scalars per forward pass (default: 16,384 with the native kernel, 2,048 with the torch layout on the
    CPU; 4M on CUDA).
    """
    if method not in METHODS:
        raise PredictError(f"unknown method {method!r}; known: {list(METHODS)}")
    if steps < 1:
        raise PredictError(f"steps must be >= 1, got {steps}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise PredictError(f"chunk must be a positive number of scalars, got {chunk!r}")
    _validate(stages)
    kinds = dict(kinds) if kinds is not None else infer_kinds(stages[0])
    if method.startswith("known"):
        models = models if models is not None else registry.load_predictor(method)
        missing = [k for k in PREDICTED_KINDS if not models or k not in models]
        if missing:
            raise PredictError(f"method {method!r} needs a KNOWN for {missing}")
    names = {k: [n for n in stages[0] if kinds.get(n) == k] for k in PREDICTED_KINDS}
    # one [N, S] window per kind, least data first, as KNOWN reads it
    windows = {
        k: torch.stack([torch.cat([st[n].reshape(-1).float() for n in ns]) for st in reversed(stages)], dim=1)
        for k, ns in names.items() if ns
    }
    outputs = []
    for _ in range(steps):
        new = {n: t.clone() for n, t in stages[0].items()}  # unpredicted kinds: Θ0's values
        for k, w in windows.items():
            nxt = _step(w, method, models[k] if models else None, chunk, [stages[0][n].numel() for n in names[k]])
            offset = 0
            for n in names[k]:
                numel = stages[0][n].numel()
                new[n] = nxt[offset : offset + numel].reshape(stages[0][n].shape).to(stages[0][n].dtype)
                offset += numel
            windows[k] = torch.cat([w[:, 1:], nxt[:, None]], dim=1)
        outputs.append(new)
    return outputs


def image_batches(dataset: str, images: torch.Tensor, batch: int = 500) -> Iterable[torch.Tensor]:
    """Normalised batches of ``images`` (uint8, one of our datasets), ready for ``reestimate_bn``."""
    for i in range(0, len(images), batch):
        yield data.normalize(dataset, images[i : i + batch])


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable | str, images: torch.Tensor | None = None, batch: int = 500) -> None:
    """Recompute every BatchNorm's running statistics as the average over ``batches``: any iterable of image
    batches the model takes (a user's own data; (images, labels) pairs from a DataLoader are fine), or one of
    our dataset names with its uint8 ``images``. Use it after loading predicted weights: statistics copied
    from Θ0 no longer match them (measured in docs/known.md: known-official 0.29 -> 0.49 source accuracy,
    TaskVector 0.466 -> 0.481)."""
    if isinstance(batches, str):
        if images is None:
            raise PredictError(f"reestimate_bn on dataset {batches!r} needs its images")
        batches = image_batches(batches, images, batch)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    seen = 0
    try:
        for x in batches:
            model(x[0] if isinstance(x, (tuple, list)) else x)
            seen += 1
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
        model.eval()
    if not seen:
        raise PredictError("reestimate_bn got no image batches: the running statistics would stay reset")


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a file written by ``torch.save`` loaded with weights_only=True (no
    pickle code); anything else, a bare pickle above all, is refused unread."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"stage file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path))
        if not zipfile.is_zipfile(path):  # torch.save's format; a bare pickle is never handed to an unpickler
            raise PredictError(f"{path} is neither .safetensors nor a torch.save state dict (.pt/.pth)")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (safetensors.SafetensorError, pickle.UnpicklingError, RuntimeError) as e:
        raise PredictError(f"{path} is not a readable state dict: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PredictError(f"{path} does not hold a flat state dict of tensors")
    return state


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(
        prog="python -m known.predict",
        description="Predict knowledge-overflowed weights (Θ-1, Θ-2, …) from S=5 stage checkpoints of one model.",
    )
    p.add_argument("--stages", nargs=S, required=True, metavar="FILE",
                   help=f"the {S} stage checkpoints (.safetensors, or .pt/.pth state dicts), Θ0 (most data) first")
    p.add_argument("--method", default="known", choices=METHODS,
                   help="known: our KNOWN; known-official: the authors' weights (--official DIR); "
                        "taskvector: Θ0 + 0.2(Θ0 − Θ1); linearfit / logfit / expfit: per-coordinate curve fits")
    p.add_argument("--steps", type=int, default=3, help="how many stages back to predict (×1/r, ×1/r², …)")
    p.add_argument("--official", metavar="DIR", help="folder with KNOWN_Conv.h5, KNOWN_FC.h5, KNOWN_Bias.h5")
    p.add_argument("--known", metavar="URI", help="our KNOWN for --method known: models:/KNOWN@champion, "
                   "models:/KNOWN/<version> or a folder of safetensors (default: the shipped one)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of --known models:/… "
                   "(default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/step1.safetensors … (one per step)")
    args = p.parse_args(argv)
    try:
        if args.steps < 1:
            raise PredictError(f"--steps must be >= 1, got {args.steps}")
        storage.check_output(args.out, folder=True, flag="--out")
        stages = [load_state(f) for f in args.stages]
        source = args.official if args.method == "known-official" else args.known
        if args.method == "known-official" and not source:
            raise PredictError("--method known-official needs --official DIR")
        models = registry.load_predictor(args.method, source, args.tracking_uri)
        preds = retrodict(stages, args.steps, args.method, models=models)
    except (OblivionError, OSError) as e:  # OSError: a missing or unreadable file, an unwritable --out
        return cli.fail(e)
    fs, out = storage.resolve(args.out)
    fs.create_dir(out, recursive=True)
    for i, state in enumerate(preds, 1):
        path = storage.join(out, f"step{i}.safetensors")
        storage.write_atomic(fs, path, safetensors.torch.save({k: v.contiguous() for k, v in state.items()}))
        print(f"step {i} (×1/r^{i}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
