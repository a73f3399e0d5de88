"""Tensor kinds of modern architectures are decided, not guessed: every prediction loads back strictly."""

import pytest
import torch
from torchvision import models as tvm

from collectors import zoo
from known.predict import infer_kinds, retrodict


def _stages(model, n=5):
    """A tiny fake trajectory: n perturbed copies of the state dict (Θ0 first)."""
    g = torch.Generator().manual_seed(0)
    return [{k: t + 0.01 * i * torch.randn(t.shape, generator=g) if t.is_floating_point() else t.clone()
             for k, t in model.state_dict().items()} for i in range(n)]


def small_vit():
    return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                 num_classes=10)


def small_swin():
    return tvm.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                               num_classes=10)


def check_kinds(kinds: dict, expect: dict) -> None:
    for name, kind in expect.items():
        assert kinds[name] == kind, name
    assert "other" not in kinds.values(), [n for n, k in kinds.items() if k == "other"]


VIT_KINDS = {"class_token": "embedding", "encoder.pos_embedding": "embedding", "conv_proj.weight": "conv",
             "encoder.layers.encoder_layer_0.self_attention.in_proj_weight": "linear",
             "encoder.layers.encoder_layer_0.self_attention.in_proj_bias": "bias",
             "encoder.layers.encoder_layer_0.self_attention.out_proj.weight": "linear",
             "encoder.layers.encoder_layer_0.ln_1.weight": "norm", "encoder.layers.encoder_layer_0.ln_1.bias": "norm",
             "heads.head.bias": "bias"}
SWIN_KINDS = {"features.0.0.weight": "conv", "features.0.2.weight": "norm",
              "features.1.0.attn.relative_position_bias_table": "embedding",
              "features.1.0.attn.relative_position_index": "buffer", "features.1.0.attn.qkv.weight": "linear",
              "features.1.0.attn.qkv.bias": "bias", "features.1.0.norm1.bias": "norm"}


@pytest.mark.parametrize("build, expect, method", [(small_vit, VIT_KINDS, "known"), (small_swin, SWIN_KINDS, "known"),
                                           (lambda: tvm.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                                              num_classes=3),
                                            {"classifier.cbr.0.weight": "conv", "classifier.cbr.1.weight": "norm",
                                             "classifier.high_classifier.bias": "bias"},
                                            "taskvector")],  # 3.2M scalars: ~20 s through KNOWN on 2 cores
                         ids=["vit", "swin", "lraspp"])
def test_known_predicts_transformers_and_segmentation_with_explicit_kinds(build, expect, method):
    torch.manual_seed(0)
    model = build()
    kinds = zoo.tensor_kinds(model)
    check_kinds(kinds, expect)
    assert infer_kinds(model.state_dict()) == kinds  # a bare state dict gets the same decisions
    stages = _stages(model)
    pred = retrodict(stages, steps=1, method=method)[0]  # no models: the shipped KNOWN; kinds from the state dict
    model.load_state_dict(pred, strict=True)
    for name, kind in kinds.items():
        moved = not torch.equal(pred[name], stages[0][name])
        assert moved == (kind in ("conv", "linear", "bias")), (name, kind)


@pytest.mark.slow
@pytest.mark.parametrize("build", [tvm.vit_b_16, tvm.swin_t], ids=["vit_b_16", "swin_t"])
def test_full_size_transformer_kinds(build):
    model = build(weights=None)
    kinds = zoo.tensor_kinds(model)
    check_kinds(kinds, VIT_KINDS if build is tvm.vit_b_16 else SWIN_KINDS)
    assert infer_kinds(model.state_dict()) == kinds
