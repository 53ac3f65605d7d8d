"""Hugging Face transformers' own image classifiers, where transformers is installed: each one's groups found,
three of every removable kind zeroed, and the export cut as the training counts it. Not a dependency: skipped
without it."""

from __future__ import annotations

import copy
import importlib.util
import random

import pytest
import torch
from counted_cut import assert_cut_as_counted, assert_thinned_exactly, exported
from zeroing import zero_groups

from sslcompress.finetune.counting import count
from sslcompress.finetune.groups import build_groups
from sslcompress.surgery.compress import compress

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                 reason="transformers is not installed")]

SHAPE = (1, 3, 32, 32)


def _configs():
    import transformers as T

    return {
        "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=10)),
        "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)),
        "mobilenet_v2": lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            image_size=32, depth_multiplier=0.35, num_labels=10)),  # TF-style padding by F.pad
        "efficientnet": lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(
            image_size=32, width_coefficient=1.0, depth_coefficient=0.2, hidden_dim=1280, num_labels=10)),  # ZeroPad2d, a Conv2d subclass
        "deit": lambda: T.DeiTForImageClassification(T.DeiTConfig(
            image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, num_labels=10)),
        "regnet": lambda: T.RegNetForImageClassification(T.RegNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=10)),
        # Windows folded into the batch axis, a relative position bias per head (its table sliced with the
        # heads), and in every second block shifted windows with a mask added to that bias.
        "swin": lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
            num_labels=10)),
        # Post-norm blocks (a branch ends in its LayerNorm), a position bias MLP on a coordinate table (folded
        # into a constant by every export, so no layer of the count), a learned logit scale per head.
        "swinv2": lambda: T.Swinv2ForImageClassification(T.Swinv2Config(
            image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
            num_labels=10)),
        # A relative position bias per head built from tensors its forward makes (lifted by torch.export).
        "beit": lambda: T.BeitForImageClassification(T.BeitConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, use_relative_position_bias=True, num_labels=10)),
        # Weight-standardised convs (their weights computed in the forward): walls, counted as exported.
        "bit": lambda: T.BitForImageClassification(T.BitConfig(
            embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=10)),
        "dinov2": lambda: T.Dinov2ForImageClassification(T.Dinov2Config(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
            use_swiglu_ffn=True, num_labels=10)),
        # Convs after its attention's reshape to (B, H, W, C) (a wall, counted), a softmax over one value.
        "swiftformer": lambda: T.SwiftFormerForImageClassification(T.SwiftFormerConfig(
            depths=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48], num_labels=10)),
    }


class Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


@pytest.mark.parametrize("name", ["resnet", "convnext", "mobilenet_v2", "efficientnet", "deit", "regnet", "swin",
                                  "swinv2", "beit", "bit", "dinov2", "swiftformer"])
def test_transformers_classifier_is_cut_as_counted(name):
    torch.manual_seed(0)
    model = Logits(_configs()[name]()).eval()
    groups = [g for g in build_groups(model, SHAPE, ("filter", "channel", "neuron", "head", "depth")) if g.removable]
    kinds = sorted({g.kind for g in groups})
    # The count is the export's before any zero too (a layer on constants, a computed weight).
    dense, dense_macs = copy.deepcopy(model), count(model, SHAPE).macs
    if name == "bit":  # every conv weight-standardised: no groups, but counted and exported as it computes
        assert kinds == []
        assert dense_macs == compress(exported(dense, SHAPE)).report["totals"]["macs"]
        return
    assert {"filter", "channel"} <= set(kinds)
    if name in ("deit", "swin"):
        assert "head" in kinds
    # Residual blocks, and MLP branches (a LayerNorm read as its module; ConvNeXt's a subclass with its own forward).
    assert "depth" in kinds or name == "efficientnet"
    rng = random.Random(0)
    zero_groups(model, [g for k in kinds for g in rng.sample([g for g in groups if g.kind == k], 1 if k == "depth" else 3)])
    # Counted before the export, as `sslcompress export` does: after a TorchScript export in the same process,
    # torch.export of transformers' Swin stops at control flow on a tensor's values.
    counted = count(model, SHAPE)
    assert_cut_as_counted(model, SHAPE, exported(model, SHAPE), counted)
    assert dense_macs == compress(exported(dense, SHAPE)).report["totals"]["macs"]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_transformers_swin_heads_thin_exactly(attention):
    torch.manual_seed(0)
    model = _configs()["swin"]()
    model.config._attn_implementation = attention
    model = Logits(model).eval()
    heads = [g for g in build_groups(model, SHAPE, ("head",)) if g.removable]
    assert len(heads) == 12  # 2 + 2 + 4 + 4
    zero_groups(model, random.Random(0).sample(heads, 3))
    assert_thinned_exactly(model, SHAPE)
    attentions = [m for m in model.modules() if type(m).__name__ == "SwinAttention"]
    counts = [(m.num_attention_heads, m.relative_position_bias.relative_position_bias_table.shape[1],
               m.q_proj.out_features // m.head_dim) for m in attentions]
    assert all(a == b == c for a, b, c in counts) and sum(a for a, _, _ in counts) == 9
