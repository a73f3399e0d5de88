"""The architecture registry: one call gives any family at any sampled size, for 28×28 or 32×32 inputs.

Each family is a pair (sampler, builder). A sampler draws a JSON-able size dict from a ``random.Random``;
the builder turns (size, in_channels, num_classes) into a torch module. torchvision's classes are reused
where they fit (DenseNet, ShuffleNetV2, MobileNetV2, ResNet's BasicBlock); only their stems are swapped
for a stride-1 3×3 convolution, because their ImageNet stems shrink a 28×28 image to nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import DenseNet, MobileNetV2, ShuffleNetV2
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import Conv2dNormActivation

MAX_PARAMS = 3_000_000


def _cnn(arch: dict, in_ch: int, num_classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    c = in_ch
    for i in range(arch["depth"]):
        w = arch["width"] * 2**i
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = w
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, arch["hidden"]),
        nn.ReLU(inplace=True),
        nn.Linear(arch["hidden"], num_classes),
    )


class _ResNet(nn.Module):
    """A CIFAR-style ResNet built from torchvision's BasicBlock, with a sampled width and depth."""

    def __init__(self, arch: dict, in_ch: int, num_classes: int):
        super().__init__()
        w = arch["width"]
        self.stem = Conv2dNormActivation(in_ch, w, kernel_size=3, stride=1)
        stages, c = [], w
        for i, n_blocks in enumerate(arch["blocks"]):
            out, stride = w * 2**i, 1 if i == 0 else 2
            blocks = []
            for b in range(n_blocks):
                down = None
                if b == 0 and (stride != 1 or c != out):
                    down = nn.Sequential(nn.Conv2d(c, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
                blocks.append(BasicBlock(c, out, stride=stride if b == 0 else 1, downsample=down))
                c = out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _densenet(arch: dict, in_ch: int, num_classes: int) -> nn.Module:
    g = arch["growth"]
    m = DenseNet(growth_rate=g, block_config=tuple(arch["blocks"]), num_init_features=2 * g, num_classes=num_classes)
    m.features.conv0 = nn.Conv2d(in_ch, 2 * g, 3, padding=1, bias=False)
    return m


def _shufflenet(arch: dict, in_ch: int, num_classes: int) -> nn.Module:
    c1 = arch["channels"]
    chans = [24, c1, 2 * c1, 4 * c1, arch["last"]]
    m = ShuffleNetV2(stages_repeats=arch["repeats"], stages_out_channels=chans, num_classes=num_classes)
    m.conv1 = Conv2dNormActivation(in_ch, 24, kernel_size=3, stride=1)
    return m


def _mobilenet(arch: dict, in_ch: int, num_classes: int) -> nn.Module:
    n = arch["repeats"]
    setting = [[1, 16, 1, 1], [6, 24, n[0], 2], [6, 32, n[1], 2], [6, 64, n[2], 2], [6, 96, n[3], 1]]
    m = MobileNetV2(num_classes=num_classes, width_mult=arch["width_mult"], inverted_residual_setting=setting, dropout=0.0)
    first = m.features[0]
    m.features[0] = Conv2dNormActivation(
        in_ch, first[0].out_channels, kernel_size=3, stride=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6
    )
    return m


def _pick(rng: random.Random, choices: list) -> object:
    return choices[rng.randrange(len(choices))]


@dataclass(frozen=True)
class Family:
    sample: Callable[[random.Random], dict]
    build: Callable[[dict, int, int], nn.Module]


FAMILIES: dict[str, Family] = {
    "cnn": Family(
        lambda rng: {"depth": rng.randint(2, 4), "width": _pick(rng, [8, 12, 16, 24, 32]), "hidden": _pick(rng, [32, 64, 128])},
        _cnn,
    ),
    "resnet": Family(
        lambda rng: {"width": _pick(rng, [8, 16, 24, 32]), "blocks": [rng.randint(1, 2) for _ in range(rng.randint(2, 3))]},
        _ResNet,
    ),
    "densenet": Family(
        lambda rng: {"growth": _pick(rng, [6, 8, 12, 16]), "blocks": [rng.randint(2, 6) for _ in range(3)]},
        _densenet,
    ),
    "shufflenet": Family(
        lambda rng: {"channels": _pick(rng, [24, 48, 64]), "repeats": [rng.randint(1, 4) for _ in range(3)], "last": _pick(rng, [128, 256, 512])},
        _shufflenet,
    ),
    "mobilenet": Family(
        lambda rng: {"width_mult": _pick(rng, [0.25, 0.35, 0.5, 0.75]), "repeats": [rng.randint(1, 3) for _ in range(4)]},
        _mobilenet,
    ),
}


def sample_arch(family: str, rng: random.Random) -> dict:
    """A random size for ``family``, drawn only from ``rng`` (so a seed fixes it)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown architecture family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family].sample(rng)


def build(family: str, arch: dict, in_channels: int, num_classes: int) -> nn.Module:
    """The module for ``family`` at size ``arch``; parameters drawn from torch's global RNG."""
    if family not in FAMILIES:
        raise ValueError(f"unknown architecture family {family!r}; known: {sorted(FAMILIES)}")
    model = FAMILIES[family].build(arch, in_channels, num_classes)
    n = n_params(model)
    if n >= MAX_PARAMS:
        raise ValueError(f"{family} {arch} has {n:,} parameters, over the {MAX_PARAMS:,} limit")
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# Attention's packed projections are linear kernels and biases (nn.MultiheadAttention keeps them as parameters
# of its own, not in an nn.Linear); out_proj is an nn.Linear
ATTENTION_KINDS = {"in_proj_weight": "linear", "q_proj_weight": "linear", "k_proj_weight": "linear",
                   "v_proj_weight": "linear", "in_proj_bias": "bias", "bias_k": "bias", "bias_v": "bias"}
# Learned tables indexed or added rather than multiplied: token embeddings, positional tables, class tokens,
# relative position biases. KNOWN never saw their trajectories in meta-training, so they are ``embedding``
# and copied from Θ0, like the norms
EMBEDDING_PARAMS = frozenset({"class_token", "cls_token", "pos_embedding", "pos_embed", "absolute_pos_embed",
                              "relative_position_bias_table", "position_embeddings", "mask_token"})


def _param_kind(mod: nn.Module, pname: str) -> str:
    """The kind of parameter ``pname`` of module ``mod`` (see ``tensor_kinds``)."""
    if isinstance(mod, _CONV):
        return "conv" if pname == "weight" else "bias"
    if isinstance(mod, nn.Linear):
        return "linear" if pname == "weight" else "bias"
    if isinstance(mod, _NORM):
        return "norm"
    if isinstance(mod, nn.MultiheadAttention) and pname in ATTENTION_KINDS:
        return ATTENTION_KINDS[pname]
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) or pname in EMBEDDING_PARAMS:
        return "embedding"
    return "other"


def tensor_kinds(model: nn.Module) -> dict[str, str]:
    """Kind of every state-dict entry: conv / linear / bias / norm / embedding / buffer (/ other).

    The kinds decide which KNOWN (conv, fc or bias) a tensor goes to; norm (BatchNorm, LayerNorm, GroupNorm)
    parameters are ``norm``, embeddings and positional tables ``embedding`` and running statistics ``buffer``,
    so that downstream code treats them on purpose (``known.predict`` copies them from Θ0).
    """
    kinds: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, _ in mod.named_parameters(recurse=False):
            kinds[prefix + pname] = _param_kind(mod, pname)
        for bname, _ in mod.named_buffers(recurse=False):
            kinds[prefix + bname] = "buffer"
    missing = set(model.state_dict()) - set(kinds)
    if missing:
        raise AssertionError(f"state-dict entries without a kind: {sorted(missing)}")
    return kinds
