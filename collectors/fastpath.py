"""What the fast sweep path changes about how the machine runs a model: channels-last activations and kernels
(oneDNN's native CPU layout), a mend where that layout leaks, and an allocator that keeps freed memory.

Measured on one thread (docs/collection.md#sweep-speed):

- **A gradient that comes back NCHW.** A global pooling or a flatten hands its gradient back contiguous; the
  first op behind it then meets an NCHW gradient and a channels-last input and takes a slow strided path
  (MobileNet's 1280-channel BatchNorm backward: 80 ms instead of 7, which made the fast path slower than the
  reference on that cell). The gradient into the model's last spatial feature map is made channels-last.
- **Page faults.** glibc maps large blocks with mmap and unmaps them when freed, and trims the heap's top back
  to the kernel, so each training step maps its activations afresh and the kernel zeroes them again (up to
  thousands of page faults a step). A fixed mmap threshold at glibc's maximum and no trimming below 1 GB keep
  them in the heap: no value changes, only where they live.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform
import weakref

import torch
from torch import nn

log = logging.getLogger(__name__)

_PREPARED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's DEFAULT_MMAP_THRESHOLD_MAX
_TRIM_THRESHOLD = 1 << 30


def prepare(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` converted to channels-last with its last feature map's gradient kept channels-last, and this
    process's allocator tuned. ``example`` (a channels-last batch of its inputs; two images are enough) finds
    the last feature map: the model runs once in eval mode without gradients, so no buffer, parameter or
    random stream changes. Calling it again on the same model does nothing."""
    keep_freed_memory()
    if model in _PREPARED:
        return model
    model.to(memory_format=torch.channels_last)
    last = last_feature_map(model, example)
    if last is not None:
        last.register_forward_hook(_gradient_channels_last)
    _PREPARED.add(model)
    return model


def last_feature_map(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """The submodule whose output is the last 4-D map with more than one position in a forward pass: what a
    global pooling or a flatten reads, so where NCHW gradients enter the network."""
    found: list[nn.Module] = []

    def probe(module, _args, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
            found.append(module)

    handles = [m.register_forward_hook(probe) for m in model.modules() if m is not model]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found[-1] if found else None


def _gradient_channels_last(_module, _args, out):
    if out.requires_grad:
        out.register_hook(lambda g: g.contiguous(memory_format=torch.channels_last))


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process (see the module's docstring); False where there is no glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the fast path's allocator settings; sweeps run, with more page faults")
    return ok
