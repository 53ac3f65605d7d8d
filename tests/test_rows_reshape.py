"""Tokens flattened into rows for a Gemm and back ((B, S, D) -> (B * S, D) -> (B, S, F)), as onnxsim writes
Linears on tokens: the MLP's hidden neurons pass such Reshapes and are cut, exactly, checked in ORT; a Reshape
that folds tokens into the features stays a wall and the model is still exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sslcompress.surgery.compress import compress

S, D, F = 5, 8, 12
DEAD = [1, 4, 5, 9]


def _mlp(rows_target: list[int], back_target: list[int], batch) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((D, F)).astype(np.float32)
    b1 = rng.standard_normal(F).astype(np.float32)
    w2 = rng.standard_normal((F, D)).astype(np.float32)
    w1[:, DEAD] = 0
    b1[DEAD] = 0
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"),
             (np.array([-1, D], np.int64), "to_rows"), (np.array(rows_target, np.int64), "hidden_rows"),
             (np.array(back_target, np.int64), "back"), (np.array([-1, S, D], np.int64), "to_tokens"),
             (np.float32(0.5), "half"))]
    nodes = [
        helper.make_node("Reshape", ["x", "to_rows"], ["r"]),
        helper.make_node("Gemm", ["r", "w1", "b1"], ["h"]),
        helper.make_node("Reshape", ["h", "back"], ["h3"]),
        helper.make_node("Tanh", ["h3"], ["t"]),
        helper.make_node("Mul", ["t", "half"], ["a"]),
        helper.make_node("Reshape", ["a", "hidden_rows"], ["a2"]),
        helper.make_node("Gemm", ["a2", "w2"], ["o"]),
        helper.make_node("Reshape", ["o", "to_tokens"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, S, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch", ["batch", 2])
def test_hidden_neurons_pass_row_reshapes(batch):
    proto = _mlp([-1, F], [-1, S, F], batch)
    res = compress(proto)
    assert res.verification.passed
    widths = {i.name: list(i.dims) for i in res.model.graph.initializer}
    assert widths["w1"] == [D, F - len(DEAD)] and widths["w2"] == [F - len(DEAD), D]
    assert res.report["totals"]["macs_after"] == S * (D * (F - len(DEAD)) * 2)


def test_a_reshape_that_folds_tokens_into_features_is_a_wall():
    # (B, S, F) -> (B, S * F) then back: the features are no longer the last axis alone.
    proto = _mlp([-1, S * F], [-1, S, F], "batch")
    proto.graph.node[5].input[1] = "flat"
    proto.graph.initializer.append(numpy_helper.from_array(np.array([-1, F], np.int64), "flat"))
    # Insert a fold-into-features round trip before the second Gemm.
    fold = helper.make_node("Reshape", ["a", "tokens_in_features"], ["a_flat"])
    proto.graph.initializer.append(numpy_helper.from_array(np.array([-1, S * F], np.int64), "tokens_in_features"))
    proto.graph.node[5].input[0] = "a_flat"
    proto.graph.node.insert(5, fold)
    res = compress(proto)
    assert res.verification.passed
    assert any("Reshape" in why for why in res.report["blocked_by"])
    widths = {i.name: list(i.dims) for i in res.model.graph.initializer}
    assert widths["w1"] == [D, F]  # kept: what reads the neurons is not followed
