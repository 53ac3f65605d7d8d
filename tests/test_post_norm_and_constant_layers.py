"""Two things Swin V2 writes. A residual branch that ends in a LayerNorm (post-norm inside the branch,
`x + norm(mlp(x))`): with its scale and shift zero it adds zero, so it is a depth group, and the surgery reads a
LayerNormalization's zero-scale channels as their shift, so the branch goes as counted. And layers computed from
parameters and buffers alone (its position bias MLP on a coordinate table): every export folds them into
constants, so they are no layers of the count, which must be the export's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from counted_cut import assert_cut_as_counted, exported
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from untraceable import untraceable
from zeroing import zero_groups

from sslcompress.finetune.counting import count
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.structure import analyze
from sslcompress.surgery.compress import compress

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 3, 16, 16)


class PostNormBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), nn.LayerNorm(dim)

    def forward(self, x):
        return x + self.norm(self.fc2(F.gelu(self.fc1(x))))


class PositionBias(nn.Module):
    """A bias over the tokens from an MLP on a fixed table of coordinates: no input reaches it."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.register_buffer("coords", torch.linspace(-1, 1, tokens * 2).view(tokens, 2), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, dim))

    def forward(self):
        return 16 * torch.sigmoid(self.mlp(self.coords))


class PostNormNet(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.bias = PositionBias(16, dim)
        self.blocks = nn.Sequential(PostNormBlock(dim), PostNormBlock(dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.bias()
        return self.head(self.blocks(tokens).mean(1))


def _model(traced: str) -> nn.Module:
    torch.manual_seed(0)
    return (PostNormNet if traced == "fx" else untraceable(PostNormNet))().eval()


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
def test_layers_on_constants_are_no_layers_and_the_count_is_the_exports(traced):
    model = _model(traced)
    st = analyze(model, SHAPE)
    assert not any(name.startswith("bias.") for name in st.layers)
    assert not any(".mlp." in g.name for g in build_groups(model, SHAPE, ("neuron", "filter", "channel")))
    assert count(model, SHAPE).macs == compress(exported(model, SHAPE)).report["totals"]["macs"]


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_branch_ending_in_a_layer_norm_is_a_depth_group_cut_as_counted(traced, exporter):
    model = _model(traced)
    groups = {g.name: g for g in build_groups(model, SHAPE, ("neuron", "depth")) if g.removable}
    assert sorted(n for n in groups if n.startswith("depth")) == [
        "depth blocks.0", "depth blocks.1"]
    zero_groups(model, [groups["depth blocks.1"], groups["neuron blocks.0.fc1[3]"]])
    result, counted = assert_cut_as_counted(model, SHAPE, exported(model, SHAPE, exporter))
    assert counted.blocks_removed == ("blocks.1",) and len(result.report["blocks_removed"]) == 1


def _post_norm_model(scale: np.ndarray, shift: np.ndarray) -> onnx.ModelProto:
    """x (1, 4, 6) + LayerNormalization(x @ w1; scale, shift), then @ w2: a post-norm branch, as a foreign model."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((6, 6)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (scale.astype(np.float32), "scale"),
                                                        (shift.astype(np.float32), "shift"))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "scale", "shift"], ["n"], axis=-1),
             helper.make_node("Add", ["x", "n"], ["s"]),
             helper.make_node("MatMul", ["s", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shift,kind", [(0.0, "removed"), (0.5, "constant"), (None, "kept")])
def test_a_layer_norm_of_zero_scale_is_its_shift(shift, kind):
    """Every scale zero: the norm's output is its shift whatever the input, so a zero branch goes and a constant
    one becomes its constant; one nonzero scale keeps the branch (a few zero scales are no cut's business:
    the norm's width stays whole)."""
    scale = np.zeros(6) if shift is not None else np.array([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    result = compress(_post_norm_model(scale, np.full(6, shift if shift is not None else 0.0)))
    assert result.verification.passed
    assert (len(result.report["blocks_removed"]), len(result.report["blocks_constant"])) == \
        {"removed": (1, 0), "constant": (0, 1), "kept": (0, 0)}[kind]
    assert result.report["totals"]["macs_after"] == (72 if kind != "kept" else 216)
    assert ("LayerNormalization" in [n.op_type for n in result.model.graph.node]) == (kind == "kept")
