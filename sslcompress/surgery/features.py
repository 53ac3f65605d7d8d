"""The pass that lets a Gemm or MatMul read only the input features it uses.

Where a layer's input cannot lose channels (a graph input: the paper's MLP drops input pixels,
or a tensor a wall pins), zero rows of its weight still cost MACs. A Gather of the used
features in front of the layer and the weight without those rows compute the same product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .ops.base import (
    add_initializer,
    attr_value,
    const_tensor,
    input_or_none,
    quant_blocker,
    rank_of,
    take_const,
)
from .ops.quant import activation_dequantize, dequantize_again, splits_a_signed_pair


@dataclass(frozen=True)
class FeatureResult:
    selected: dict[str, tuple[int, int]]  # layer -> (features before, features read now)


def select_features(model: ir.Model) -> FeatureResult:
    """Gather the used features in front of each such layer, in place."""
    selected: dict[str, tuple[int, int]] = {}
    for node in list(model.graph):
        weight = _weight_in_out(node)
        if weight is None:
            continue
        used = np.abs(weight).sum(1) > 0  # per input feature
        if used.all() or not used.any():
            continue
        kept = np.nonzero(used)[0].astype(np.int64)
        name = node.name or node.outputs[0].name
        x = node.inputs[0]
        dq = activation_dequantize(x)  # a quantized input: gather the quantized tensor, then dequantize
        if dq is not None and splits_a_signed_pair(dq):
            continue  # a Gather inside an int8 Q -> DQ pair would change how the runtime fuses it
        source = dq.inputs[0] if dq is not None else x
        picked = ir.Value(name=f"{x.name}.{name}.features", type=source.type,
                          shape=ir.Shape([x.shape[0], len(kept)]) if x.shape is not None else None)
        indices = add_initializer(model.graph, f"{name}.feature_indices", kept)
        gather = ir.Node("", "Gather", [source, indices], attributes=[ir.AttrInt64("axis", 1)],
                         outputs=[picked], name=f"{name}.select_features")
        model.graph.insert_before(node, gather)
        if dq is not None:
            dequantize_again(model.graph, node, 0, dq, picked, keep=kept)
        else:
            node.replace_input_with(0, picked)
        transposed = node.op_type == "Gemm" and attr_value(node, "transB", 0)
        take_const(model.graph, node, 1, lambda a, k=kept, t=transposed: a[:, k] if t else a[k])
        selected[name] = (len(used), len(kept))
    return FeatureResult(selected)


def _weight_in_out(node: ir.Node) -> np.ndarray | None:
    """The weight as (in features, out) for a Gemm/MatMul of a rank-2 input by a constant."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Gemm", "MatMul") or rank_of(node.inputs[0]) != 2:
        return None
    w = const_tensor(input_or_none(node, 1))
    if w is None or w.ndim != 2 or (node.op_type == "Gemm" and attr_value(node, "transA", 0)):
        return None
    if quant_blocker(node.inputs[1]) is not None:
        return None  # a quantization the surgery does not slice
    return w.T if node.op_type == "Gemm" and attr_value(node, "transB", 0) else w
