"""Training-time image augmentation for the ``crop_flip`` protocol: random crop with padding + horizontal flip.

Done on whole uint8 batches with tensor indexing (no per-image Python loop, no DataLoader), drawing every
random number from the generator it is given, so a sweep's seed fixes every crop and flip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """``x`` [B, C, H, W], each image zero-padded by ``pad`` (default H // 8), cropped back to H×W at a
    random offset and flipped left-right with probability ½."""
    b, _, h, w = x.shape
    pad = h // 8 if pad is None else pad
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = dy[:, None] + torch.arange(h)[None, :]  # [B, H]
    cols = dx[:, None] + torch.arange(w)[None, :]  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
