"""Softmaxes over an axis of size 1 written as the constants they are, before onnxsim simplifies the export.

A softmax over one element is 1 whatever it reads (a log-softmax 0): attention over a single key (MobileViT's
blocks on a map of one patch), SwiftFormer's ``(q @ w_g).softmax(-1)`` of a (B, N, 1) value. The count holds
that every export folds it and computes nothing of what only it reads (``structure._unused_values``: the query
and key projections of such an attention hold no MACs). onnxsim does fold it, but its ``fuse_qkv`` may first
pack the query and key MatMuls with the value's into one MatMul and a Split, and the packed MatMul then still
computes the dead query and key columns: the export computed more than the count said. Folded before onnxsim,
what only the softmax read is gone before any fusion sees it.

Only a static size of 1 is folded (the shapes read with the surgery's own passes, at the export's input
shape); an export with a dynamic batch keeps its softmaxes for onnxsim, and a model without such a softmax is
passed on as it came.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from ..errors import SSLCompressError
from .ops.base import attr_value

_OPS = {"Softmax": 1.0, "LogSoftmax": 0.0}  # op -> what it computes over one element
_FLOATS = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16}


def _constant_value(node: ir.Node, opset: int) -> float | None:
    """1 (0) for a softmax (log-softmax) whose every group holds one element at static sizes, else None."""
    x = node.inputs[0] if node.inputs else None
    if x is None or x.shape is None or x.dtype not in _FLOATS or not all(isinstance(d, int) for d in x.shape):
        return None
    rank = len(x.shape)
    # Before opset 13 the input is read as 2-D, (dims before axis, dims from axis on), axis 1 by default.
    axis = int(attr_value(node, "axis", 1 if opset < 13 else -1))
    if not -rank <= axis < rank:
        return None
    axis %= rank
    group = x.shape[axis:] if opset < 13 else x.shape[axis:axis + 1]
    return _OPS[node.op_type] if all(d == 1 for d in group) else None


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def _over_one(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], ir.DataType, float]]:
    """Output name -> (shape, dtype, value) of each softmax of the model's own graph over one element."""
    from .passes import run_passes
    from .prepare import prepare_passes

    probe = ir.serde.deserialize_model(model)
    try:
        # Shapes behind Reshape targets computed from Shape nodes are known once those fold.
        run_passes(probe, prepare_passes())
    except SSLCompressError:
        return {}  # a graph the passes cannot read: onnxsim folds what it can, as without this step
    opset = _opset(probe)
    found = {}
    for node in probe.graph:
        if node.op_type in _OPS and node.domain in ("", "ai.onnx"):
            value = _constant_value(node, opset)
            if value is not None:
                x = node.inputs[0]
                found[node.outputs[0].name] = (tuple(int(d) for d in x.shape), x.dtype, value)
    return found


def fold_softmax_over_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every softmax over one element replaced by its constant and whatever only it read
    removed; the model itself where there is none (module docstring)."""
    if not any(n.op_type in _OPS and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    found = _over_one(model)
    if not found:
        return model
    work = ir.serde.deserialize_model(model)
    folded = False
    for node in list(work.graph):
        out = node.outputs[0] if node.op_type in _OPS and node.domain in ("", "ai.onnx") and node.outputs else None
        if out is None or out.name not in found or out.is_graph_output():
            continue
        shape, dtype, value = found[out.name]
        array = np.full(shape, value, dtype=dtype.numpy())
        const = ir.Value(name=f"{out.name}.constant", shape=ir.Shape(shape), type=ir.TensorType(dtype),
                         const_value=ir.tensor(array, name=f"{out.name}.constant"))
        work.graph.register_initializer(const)
        out.replace_all_uses_with(const)
        folded = True
    if not folded:
        return model
    common.RemoveUnusedNodesPass()(work)
    return ir.serde.serialize_model(work)
