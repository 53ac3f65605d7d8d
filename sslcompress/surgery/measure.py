"""MACs, parameters and per-layer shapes of an ONNX model: the numbers in a surgery report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx


@dataclass(frozen=True)
class OnnxLayer:
    name: str
    op: str
    weight_shape: tuple[int, ...]
    macs: int  # per sample


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim]
            for v in list(g.value_info) + list(g.output) + list(g.input)}


def layers(proto: onnx.ModelProto) -> list[OnnxLayer]:
    """Conv, ConvTranspose, Gemm and MatMul nodes with constant weights, in graph order."""
    shapes = _shapes(proto)
    inits = _constant_shapes(proto)
    out = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        lhs_weight = node.op_type == "MatMul" and w is None and node.input[0] in inits
        if lhs_weight:  # a lowered conv: MatMul(weight (M, K), columns (N, K, P))
            w = inits[node.input[0]]
        if w is None:
            continue
        if node.op_type == "Conv":
            y = shapes.get(node.output[0], [])
            spatial = int(np.prod(y[2:])) if len(y) > 2 else 1
            macs = int(np.prod(w)) * spatial
        elif node.op_type == "ConvTranspose":
            x = shapes.get(node.input[0], [])
            macs = int(np.prod(w)) * (int(np.prod(x[2:])) if len(x) > 2 else 1)
        elif lhs_weight:
            y = shapes.get(node.output[0], [])
            macs = int(np.prod(w)) * (y[-1] if y else 1)
        else:
            x = shapes.get(node.input[0], [])
            rows = int(np.prod(x[1:-1])) if len(x) > 2 else 1
            macs = int(np.prod(w)) * rows
        out.append(OnnxLayer(node.name or node.output[0], node.op_type, w, macs))
    return out


def _constant_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of the graph's constants: initializers and the tensors of Constant nodes."""
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(a.t.dims)
                elif a.name in ("value_floats", "value_ints"):
                    shapes[node.output[0]] = (len(a.floats) + len(a.ints),)
    return shapes


def parameters(proto: onnx.ModelProto) -> int:
    """Elements of every constant tensor (weights, biases, shape constants)."""
    return int(sum(int(np.prod(s)) for s in _constant_shapes(proto).values()))
