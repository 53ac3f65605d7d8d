"""A MobileViT block on a map of one patch: its feature map unfolded into sequences of one token each, a pre-norm
transformer layer over them, folded back. Attention over one key is a softmax over an axis of size 1, ones
whatever the scores: the count holds the query and key projections computed by no export, and the export
folds that softmax before onnxsim, whose fuse_qkv would otherwise pack the dead query and key MatMuls with the
value's. The MLP's hidden neurons run on the last axis of (tokens, 1, features), and the Reshape to
(tokens, features) before the second Linear's Gemm reads them there (not as a flatten of axis 1)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from counted_cut import assert_cut_as_counted, exported
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from zeroing import zero_groups

from sslcompress.finetune.counting import count
from sslcompress.finetune.groups import build_groups
from sslcompress.surgery.compress import compress
from sslcompress.surgery.softmax_over_one import fold_softmax_over_one

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 3, 4, 4)  # a 2x2 map after the stem: one patch of 2x2


class Attention(nn.Module):
    """Transformers' MobileViTSelfAttention: q, k and v Linears, heads by view and transpose."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.head_size = d // heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        shape = (*x.shape[:-1], -1, self.head_size)
        q = self.query(x).view(shape).transpose(1, 2)
        k = self.key(x).view(shape).transpose(1, 2)
        v = self.value(x).view(shape).transpose(1, 2)
        p = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_size), dim=-1)
        o = (p @ v).permute(0, 2, 1, 3).contiguous()
        return self.out(o.view(*o.shape[:-2], -1))


class Layer(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        # Without a bias onnxsim leaves fc1 a MatMul on (tokens, 1, 2d), and fc2 a Gemm behind a Reshape to rows.
        self.fc1, self.fc2 = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d)

    def forward(self, t):
        t = self.attn(self.norm1(t)) + t
        return self.fc2(F.silu(self.fc1(self.norm2(t)))) + t


class OnePatchBlock(nn.Module):
    """MobileViTLayer's unfolding and folding of 2x2 patches around its transformer layers."""

    def __init__(self, c: int = 8, d: int = 16, heads: int = 2, layers: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.proj_in = nn.Conv2d(c, d, 1)
        self.layers = nn.ModuleList(Layer(d, heads) for _ in range(layers))
        self.proj_out = nn.Conv2d(d, c, 1)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        f = self.proj_in(F.relu(self.stem(x)))
        b, d, h, w = f.shape
        # (B, d, H, W) -> (B * patch area, patches, d)
        t = f.reshape(b * d * (h // 2), 2, w // 2, 2).transpose(1, 2).reshape(b, d, -1, 4).transpose(1, 3)
        t = t.reshape(b * 4, -1, d)
        for layer in self.layers:
            t = layer(t)
        f = t.contiguous().view(b, 4, -1, d).transpose(1, 3).reshape(b * d * (h // 2), w // 2, 2, 2)
        f = f.transpose(1, 2).reshape(b, d, h, w)
        return self.head(F.relu(self.proj_out(f)).mean((2, 3)))


def _model() -> OnePatchBlock:
    torch.manual_seed(0)
    return OnePatchBlock().eval()


def test_attention_over_one_key_is_counted_as_exported():
    model = _model()
    proto = exported(model, SHAPE)
    widths = {i.name: list(i.dims) for i in proto.graph.initializer}
    # Only the value projections are computed: no packed q/k/v MatMul, no Split of one.
    assert not any(n.op_type == "Split" for n in proto.graph.node)
    assert [16, 48] not in widths.values()
    assert count(model, SHAPE).macs == compress(proto).report["totals"]["macs"]
    x = torch.randn(2, *SHAPE[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x[:1]).numpy()
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x[:1].numpy()})[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_hidden_neurons_of_one_token_rows_are_cut_as_counted():
    model = _model()
    groups = {g.name: g for g in build_groups(model, SHAPE, ("filter",))}
    zero_groups(model, [groups["filter layers.0.fc1[3]"], groups["filter layers.1.fc1[5]"],
                        groups["filter layers.1.fc1[6]"]])
    result, counted = assert_cut_as_counted(model, SHAPE, exported(model, SHAPE))
    assert counted.layer("layers.0.fc1").filters == (31, 32) and counted.layer("layers.1.fc2").channels == (30, 32)
    assert result.report["blocked_by"] == {}


def _softmax_model(op: str, shape: list[int], axis: int, opset: int) -> onnx.ModelProto:
    """x @ w -> op over `axis` -> times x: the MatMul reaches the output only through the softmax."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((shape[-1], shape[-1])).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"]), helper.make_node(op, ["s"], ["p"], axis=axis),
             helper.make_node("Mul", ["p", "x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("op, shape, axis, opset, folds", [
    ("Softmax", [2, 3, 1], -1, 17, True),
    ("LogSoftmax", [2, 3, 1], -1, 17, True),
    ("Softmax", [2, 1, 3], 1, 17, True),
    ("Softmax", [2, 1, 3], -1, 17, False),
    # Before opset 13 the input is read as 2-D from the axis on: groups of 1 x 3 elements, then of 1 x 1.
    ("Softmax", [2, 1, 3], 1, 11, False),
    ("Softmax", [2, 1, 1], 1, 11, True),
])
def test_only_a_softmax_over_one_element_is_folded(op, shape, axis, opset, folds):
    proto = _softmax_model(op, shape, axis, opset)
    out = fold_softmax_over_one(proto)
    if not folds:
        assert out is proto
        return
    assert [n.op_type for n in out.graph.node] == ["Mul"]  # the MatMul only the softmax read is gone too
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    runs = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for p in (proto, out)]
    assert np.array_equal(runs[0], runs[1])


def test_dead_query_and_key_packed_with_the_value_are_cut_whole(monkeypatch):
    """An export whose softmax onnxsim folded only after packing q, k and v (any exporter's but ours): the query
    and key parts of the packed MatMul's Split are read by nothing, and go whole (parts of size 0)."""
    from sslcompress.surgery import export

    monkeypatch.setattr(export, "fold_softmax_over_one", lambda model: model)
    model = _model()
    groups = {g.name: g for g in build_groups(model, SHAPE, ("filter",))}
    zero_groups(model, [groups["filter layers.0.fc1[3]"]])
    proto = exported(model, SHAPE)
    assert [n.op_type for n in proto.graph.node].count("Split") == 2
    result = compress(proto)
    assert result.verification.passed
    assert result.report["totals"]["macs_after"] == count(model, SHAPE).macs_after
    widths = [list(i.dims) for i in result.model.graph.initializer]
    assert [16, 48] not in widths and widths.count([16, 16]) >= 2  # each packed MatMul keeps v's columns
