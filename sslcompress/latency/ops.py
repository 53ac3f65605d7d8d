"""One-op ONNX models (a Conv, a Gemm, or a MatMul and its bias) with random float32 weights, at given widths.

The bias is always there: the export folds BatchNorm into the conv before it, so a compact model's convs
carry one whether or not the torch layer had it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .signature import Signature

OPSET = 17
IR_VERSION = 8


def op_model(sig: Signature, in_width: int, out_width: int, batch: int, seed: int = 0) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """The op of `sig` at these widths, and the shape of its input."""
    rng = np.random.default_rng(seed)
    if sig.kind == "conv":
        return _conv(sig, in_width, out_width, batch, rng)
    return _linear(sig, in_width, out_width, batch, rng)


def _weights(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)


def _model(nodes, x_shape, inits) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "op", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def relu_model(width: int) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A Relu of `width` elements (next to nothing to compute: what ORT's profiler reads for it is its own cost
    per node, kernel.profiler_floor_ms), and the shape of its input."""
    return _model([helper.make_node("Relu", ["x"], ["y"])], (1, width), []), (1, width)


def _conv(sig: Signature, cin: int, cout: int, batch: int, rng) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    # A depthwise conv at width w is w groups of one channel; a grouped conv keeps its groups.
    groups = cin if sig.depthwise else sig.groups
    # A Conv1d's (1 x K) geometry loses its row axis: the op is the 1-D Conv the export writes.
    axes = slice(1, 2) if sig.dims == 1 else slice(0, 2)
    kernel, stride, pads, dilation, in_hw = (list(v[axes]) for v in (sig.kernel, sig.stride, sig.padding,
                                                                      sig.dilation, sig.in_hw))
    x_shape = (batch, cin, *in_hw)
    inits = [_weights(rng, "w", (cout, cin // groups, *kernel)), _weights(rng, "b", (cout,))]
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=kernel, strides=stride, pads=pads + pads,
                            dilations=dilation, group=groups)
    return _model([node], x_shape, inits), x_shape


def _linear(sig: Signature, fin: int, fout: int, batch: int, rng) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    if sig.rows == 1:  # what the export makes of a Linear on (batch, features)
        inits = [_weights(rng, "w", (fout, fin)), _weights(rng, "b", (fout,))]
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
        return _model([node], (batch, fin), inits), (batch, fin)
    # On (batch, tokens, features): MatMul and Add, as the export writes it.
    inits = [_weights(rng, "w", (fin, fout)), _weights(rng, "b", (fout,))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    x_shape = (batch, sig.rows, fin)
    return _model(nodes, x_shape, inits), x_shape
