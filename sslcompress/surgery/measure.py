"""MACs, parameters and per-layer shapes of an ONNX model: the numbers in a surgery report.

Read from an onnx_ir model whose shapes are inferred (the surgery's own, after its constants were
folded, so a Pad built from shape arithmetic no longer hides the sizes behind it); a ModelProto is
read the same way after shape inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from .ops.base import attr_value, const_tensor, is_quantized_const


@dataclass(frozen=True)
class OnnxLayer:
    name: str
    op: str
    weight_shape: tuple[int, ...]
    macs: int  # per sample
    group: int = 1  # a Conv's groups: each holds weight_shape[0] / group filters of weight_shape[1] channels
    quantized: bool = False  # the weight is a DequantizeLinear of constants (a QDQ model)


def _dims(v: ir.Value | None) -> list[int]:
    """Static sizes, 1 for each symbolic or unknown one (the batch: MACs are per sample)."""
    if v is None or v.shape is None:
        return []
    return [d if isinstance(d, int) else 1 for d in v.shape]


def _weight_shape(v: ir.Value | None) -> tuple[int, ...] | None:
    if v is None:
        return None
    if v.const_value is not None:
        return tuple(int(d) for d in v.const_value.shape)
    c = const_tensor(v)
    return None if c is None else tuple(c.shape)


def layers_of(model: ir.Model) -> list[OnnxLayer]:
    """Conv, ConvTranspose, Gemm and MatMul nodes with constant weights, in graph order."""
    out = []
    for node in model.graph:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2 \
                or node.domain not in ("", "ai.onnx"):
            continue
        w = _weight_shape(node.inputs[1])
        lhs_weight = node.op_type == "MatMul" and w is None and _weight_shape(node.inputs[0]) is not None
        if lhs_weight:  # a lowered conv: MatMul(weight (M, K), columns (N, K, P))
            w = _weight_shape(node.inputs[0])
        if w is None:
            continue
        if node.op_type == "Conv":
            y = _dims(node.outputs[0])
            macs = int(np.prod(w)) * (int(np.prod(y[2:])) if len(y) > 2 else 1)
        elif node.op_type == "ConvTranspose":
            x = _dims(node.inputs[0])
            macs = int(np.prod(w)) * (int(np.prod(x[2:])) if len(x) > 2 else 1)
        elif lhs_weight:
            y = _dims(node.outputs[0])
            macs = int(np.prod(w)) * (y[-1] if y else 1)
        else:
            x = _dims(node.inputs[0])
            macs = int(np.prod(w)) * (int(np.prod(x[1:-1])) if len(x) > 2 else 1)
        group = int(attr_value(node, "group", 1)) if node.op_type in ("Conv", "ConvTranspose") else 1
        quantized = is_quantized_const(node.inputs[0] if lhs_weight else node.inputs[1])
        out.append(OnnxLayer(node.name or node.outputs[0].name, node.op_type, w, macs, group, quantized))
    return out


def quantized_weights(model: ir.Model) -> int:
    """How many layers read their weight through DequantizeLinear (a QDQ model's quantized weights)."""
    return sum(lay.quantized for lay in layers_of(model))


def parameters_of(model: ir.Model) -> int:
    """Elements of every constant tensor (weights, biases, shape constants)."""
    total = sum(int(np.prod(v.const_value.shape)) for v in model.graph.initializers.values()
                if v.const_value is not None)
    for node in model.graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            c = const_tensor(node.outputs[0])
            total += 0 if c is None else int(c.size)
    return int(total)


def _read(proto: onnx.ModelProto) -> ir.Model:
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        pass  # unknown sizes count as 1
    return ir.serde.deserialize_model(proto)


def layers(proto: onnx.ModelProto) -> list[OnnxLayer]:
    """:func:`layers_of` for a ModelProto."""
    return layers_of(_read(proto))


def parameters(proto: onnx.ModelProto) -> int:
    """:func:`parameters_of` for a ModelProto."""
    return parameters_of(ir.serde.deserialize_model(proto))
