"""Heads and MLP neurons read from ONNX graphs (what the bench reports for a transformer), for the graphs
each export writes: static batch (attention written out, Softmax over (batch, heads, queries, keys)) and
dynamic batch (ORT's contrib Attention fused by onnxsim), before and after the surgery."""

from __future__ import annotations

import pytest
import torch

from sslcompress.models.registry import build_builtin
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx
from sslcompress.surgery.units import transformer_units

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit_with_zeros():
    """vit_tiny on 8x8 images; head 1 of block 0 and head 2 of block 3 zero, and 100 + 7k neurons of block k's MLP."""
    torch.manual_seed(0)
    model = build_builtin("vit_tiny", 10, 1, (8, 8)).eval()
    with torch.no_grad():
        for block, head in ((0, 1), (3, 2)):
            att = model.blocks[block].attn
            rows = slice(head * att.head_dim, (head + 1) * att.head_dim)
            for lin in (att.q, att.k, att.v):
                lin.weight[rows] = 0
                lin.bias[rows] = 0
            att.proj.weight[:, rows] = 0
        for k, blk in enumerate(model.blocks):
            dead = slice(0, 100 + 7 * k)
            blk.mlp.fc1.weight[dead] = 0
            blk.mlp.fc1.bias[dead] = 0
            blk.mlp.fc2.weight[:, dead] = 0
    return model


@pytest.mark.parametrize("dynamic", [False, True])
def test_units_of_the_uncut_and_the_compact_vit(dynamic):
    model = _vit_with_zeros()
    exported = export_onnx(model, (1, 1, 8, 8), dynamic_batch=dynamic)
    ops = {n.op_type for n in exported.model.graph.node}
    assert ("Attention" in ops) == dynamic  # the two graphs this test means to cover
    before = transformer_units(exported.model)
    assert before.heads == (3,) * 6 and before.neurons == (384,) * 6

    result = compress(exported.model)
    assert result.verification.passed
    after = transformer_units(result.model)
    assert after.heads == (2, 3, 3, 2, 3, 3)
    assert after.neurons == tuple(384 - 100 - 7 * k for k in range(6))


def test_a_cnn_has_no_heads():
    model = build_builtin("lenet5", 10, 1, (28, 28)).eval()
    units = transformer_units(export_onnx(model, (1, 1, 28, 28)).model)
    assert units.heads == ()
