"""Attention written as Hugging Face's transformers writes its ViT's (tests/hf_style_vit.py), eager and sdpa:
head groups found in torch.export's graph, thinned (the -1 merge fills whatever heads stay), and cut as counted
by both exporters. With transformers importable, its own ViT the same way."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from counted_cut import assert_cut_as_counted, assert_thinned_exactly, exported
from hf_style_vit import HfStyleVit
from zeroing import zero_groups

from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.structure import analyze

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 1, 8, 8)


def _zeroed(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """One head of each attention and six MLP neurons of the first block zeroed."""
    groups = build_groups(model, shape, ("head", "neuron"))
    heads = [g for g in groups if g.kind == "head"]
    neurons = [g for g in groups if g.kind == "neuron" and g.removable]
    assert len(heads) == 8 and all(g.removable for g in heads)
    zero_groups(model, [heads[1], heads[6], *neurons[3:9]], rows_and_columns_only=True)
    return model


@pytest.fixture(params=["eager", "sdpa"])
def vit(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return HfStyleVit(sdpa=request.param == "sdpa").eval()


def test_heads_are_found_and_thinnable(vit):
    heads = analyze(vit, SHAPE).heads
    assert [(h.name, h.groups, h.owner, h.heads_attr, h.keeps_heads) for h in heads] == [
        (f"layers.{i}.attention", 4, f"layers.{i}.attention", "num_attention_heads", "") for i in range(2)]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_zero_heads_and_neurons_are_cut_as_counted(vit, exporter):
    model = _zeroed(vit, SHAPE)
    result, counted = assert_cut_as_counted(model, SHAPE, exported(model, SHAPE, exporter))
    assert counted.heads == (("layers.0.attention", 3, 4), ("layers.1.attention", 3, 4))
    assert result.report["zeros_kept"] == {}


def test_zero_heads_thin_exactly(vit):
    model = _zeroed(vit, SHAPE)
    assert_thinned_exactly(model, SHAPE)
    assert [layer.attention.num_attention_heads for layer in model.layers] == [3, 3]
    assert model.layers[0].attention.q_proj.out_features == 18


def test_attention_and_mlp_branches_are_depth_groups_in_torch_exports_graph(vit):
    # torch.export writes LayerNorm as aten.layer_norm of the module's parameters: read as the module, so a
    # pre-norm branch holds its scale and shift and goes whole. An attention branch is one too: its output
    # projection zero, it adds zero whatever its softmax computed, and its products go with it.
    groups = build_groups(vit, SHAPE, ("depth",))
    assert [g.name for g in groups] == ["depth layers.0[layernorm_before,attention]",
                                        "depth layers.0[layernorm_after,fc1,fc2]",
                                        "depth layers.1[layernorm_before,attention]",
                                        "depth layers.1[layernorm_after,fc1,fc2]"]
    zero_groups(vit, [groups[0], groups[3]])
    result, counted = assert_cut_as_counted(vit, SHAPE, exported(vit, SHAPE))
    assert counted.blocks_removed == ("layers.0[layernorm_before,attention]", "layers.1[layernorm_after,fc1,fc2]")
    assert len(result.report["blocks_removed"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_transformers_vit(attn):
    from transformers import ViTConfig, ViTForImageClassification

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=24, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=48, num_labels=10,
                               attn_implementation=attn)
            self.vit = ViTForImageClassification(config)

        def forward(self, x):
            return self.vit(pixel_values=x).logits

    torch.manual_seed(0)
    model = _zeroed(Logits().eval(), SHAPE)
    for exporter in ("legacy", "dynamo"):
        assert_cut_as_counted(model, SHAPE, exported(model, SHAPE, exporter))
    thinned = copy.deepcopy(model)
    assert_thinned_exactly(thinned, SHAPE)
