"""Transformer units an ONNX model computes: attention heads and MLP hidden neurons, read from the graph.

What the bench reports beside MACs, so a compact transformer shows what went (heads and neurons) whichever
exporter wrote it. Heads: the `num_heads` of a fused attention op (ONNX Attention, ORT's contrib Attention
and MultiHeadAttention), else the head axis of the scores a Softmax normalises (batch, heads, queries,
keys). Neurons: the output width of a layer with a constant weight whose output reaches, through
elementwise ops and row Reshapes only, layers with constant weights and nothing else (an MLP's hidden
units between its two Linears, whichever activation the exporter wrote out).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_ir as ir

from .measure import _FUSED_ATTENTION, _weight_shape
from .ops.base import attr_value

_LAYERS = {"MatMul", "Gemm"}
# Ops between an MLP's two layers: activations (written out or fused), bias adds, casts and row reshapes.
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Gelu", "FastGelu", "BiasGelu", "Relu",
                "Sigmoid", "HardSigmoid", "HardSwish", "Softplus", "Identity", "Cast", "Dropout", "Reshape", "Clip"}
_MAX_HOPS = 16


@dataclass(frozen=True)
class Units:
    heads: tuple[int, ...]  # per attention, in graph order
    neurons: tuple[int, ...]  # per MLP hidden layer, in graph order

    def to_dict(self) -> dict:
        return {"heads": list(self.heads), "neurons": list(self.neurons)}


def transformer_units(proto: onnx.ModelProto) -> Units:
    """Heads per attention and hidden neurons per MLP of the model; empty tuples for a model without them."""
    from .measure import _read

    model = _read(proto)
    heads, neurons = [], []
    for node in model.graph:
        if (node.op_type, node.domain) in _FUSED_ATTENTION:
            n = _fused_heads(node)
            if n:
                heads.append(n)
        elif node.op_type == "Softmax" and _scores_heads(node):
            heads.append(_scores_heads(node))
        elif _is_layer(node) and _feeds_layers_only(node.outputs[0]):
            w = _layer_weight(node)
            neurons.append(int(w[0] if node.op_type == "Gemm" and attr_value(node, "transB", 0) else w[-1]))
    return Units(tuple(heads), tuple(neurons))


def _fused_heads(node: ir.Node) -> int | None:
    n = attr_value(node, "num_heads", None) if node.domain == "com.microsoft" else attr_value(node, "q_num_heads", None)
    if n:
        return int(n)
    q = node.inputs[0] if node.inputs else None
    if q is not None and q.shape is not None and len(q.shape) == 4 and isinstance(q.shape[1], int):
        return int(q.shape[1])  # ONNX Attention on (batch, heads, sequence, head size)
    return None


def _scores_heads(node: ir.Node) -> int | None:
    """The heads of attention scores (batch, heads, queries, keys) normalised over the keys by a Softmax."""
    x = node.inputs[0]
    if x is None or x.shape is None or len(x.shape) != 4 or int(attr_value(node, "axis", -1)) not in (-1, 3):
        return None
    h = x.shape[1]
    return int(h) if isinstance(h, int) else None


def _layer_weight(node: ir.Node) -> tuple[int, ...] | None:
    w = _weight_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    return w if w is not None and len(w) == 2 else None


def _is_layer(node: ir.Node) -> bool:
    return node.op_type in _LAYERS and _layer_weight(node) is not None


def _feeds_layers_only(value: ir.Value) -> bool:
    """Whether every path from the value ends, through elementwise ops, as the activation of a layer."""
    seen, frontier, reached = set(), [value], False
    for _ in range(_MAX_HOPS):
        nxt = []
        for v in frontier:
            if v.is_graph_output():
                return False
            for user, index in v.uses():
                if _is_layer(user) and index == 0:
                    reached = True
                elif user.op_type in _ELEMENTWISE and user.domain in ("", "ai.onnx", "com.microsoft"):
                    if id(user) not in seen:
                        seen.add(id(user))
                        nxt.extend(user.outputs)
                else:
                    return False
        if not nxt:
            return reached
        frontier = nxt
    return False
