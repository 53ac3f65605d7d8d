"""The pass that folds constant channels into the layers that read them.

A channel that holds the value v everywhere adds v times its weight fibre to every output of a
Conv or Gemm that reads it. Without zero padding that is the same at every output position: a
bias. With zero padding the border sees fewer taps, so the conv's share is a constant map over
the output (the conv of a constant image), added after the conv; that needs static shapes, and at a
dynamic height or width such channels stay as they are (exact, only less compact), each conv that keeps
them named in the result with why. Once folded, the fibre is zero and the channel is read by no one, so the
prune pass deletes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from .analysis import Analysis, analysis_of
from .channels import CONSTANT
from .coupling import Coupling
from .ops.base import (
    add_initializer,
    attr_value,
    channel_axis,
    const_array,
    const_tensor,
    input_or_none,
    is_quantized_const,
    set_const,
    static_dims,
)
from .ops.layers import conv_is_padded


@dataclass(frozen=True)
class FoldResult:
    channels_folded: int  # (layer, channel) pairs folded
    bias_maps: tuple[str, ...]  # convs that got a constant map added after them
    kept: dict[str, str] = field(default_factory=dict)  # conv that still reads constant channels -> why


def fold_constant_channels(model: ir.Model, analysis: Analysis | None = None) -> FoldResult:
    """Fold constant channels into the layers that read them, in place."""
    analysis = analysis_of(model, analysis)
    states = analysis.states
    if not any(np.any(ch.state == CONSTANT) for ch in states.values()):
        return FoldResult(0, ())
    coupling = analysis.coupling
    folded = 0
    maps: list[str] = []
    kept: dict[str, str] = {}
    for node in list(model.graph):
        if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
            continue
        ch = states.get(node.inputs[0])
        w = const_array(input_or_none(node, 1))
        if ch is None or w is None or not np.any(ch.state == CONSTANT):
            continue
        if is_quantized_const(input_or_none(node, 1)) or is_quantized_const(input_or_none(node, 2)):
            # A quantized layer: a shifted bias is no longer on its quantization grid, and a float one
            # would change how runtimes that fuse QDQ compute the layer. Its constant channels stay.
            continue
        if node.op_type == "Conv":
            n, with_map = _fold_conv(model.graph, node, w, ch, _pinned(coupling, node.inputs[0]))
            if n is None:
                kept[node.name or node.outputs[0].name] = _DYNAMIC
                continue
            folded += n
            if with_map:
                maps.append(node.name or node.outputs[0].name)
        elif node.op_type == "Gemm":
            folded += _fold_gemm(model.graph, node, w, ch)
        elif node.op_type == "MatMul":
            folded += _fold_matmul(model.graph, node, w, ch)
    if folded:
        analysis.invalidate()
    return FoldResult(folded, tuple(maps), kept)


_DYNAMIC = ("reads constant channels through zero padding at a dynamic height or width; their constant map "
            "needs static sizes (export at a fixed input size to fold them)")


def _pinned(c: Coupling, value: ir.Value) -> np.ndarray | None:
    """Per channel of the value: pinned (it can never be deleted), where the coupling knows it."""
    if value not in c.ids:
        return None
    return np.isin(c.roots_of(value), list(c.pinned))


def _fold_conv(graph: ir.Graph, node: ir.Node, w: np.ndarray, ch,
               pinned: np.ndarray | None) -> tuple[int | None, bool]:
    """(channels folded, whether a constant map was added); None folded where the sizes a map needs are
    dynamic."""
    if int(attr_value(node, "group", 1)) != 1 or w.ndim != 4 or not _bias_is_constant(node):
        return 0, False
    fibres = np.abs(w).reshape(w.shape[0], w.shape[1], -1).sum(2) > 0
    cols = np.nonzero((ch.state == CONSTANT) & fibres.any(0))[0]
    if not len(cols):
        return 0, False
    dtype = const_tensor(node.inputs[1]).dtype
    new_w = const_tensor(node.inputs[1]).copy()
    new_w[:, cols] = 0
    if not conv_is_padded(node):
        shift = (w[:, cols].reshape(w.shape[0], len(cols), -1).sum(2) * ch.value[cols]).sum(1)
        set_const(graph, node, 1, new_w)
        _add_to_bias(graph, node, shift.astype(dtype))
        return len(cols), False
    if attr_value(node, "auto_pad", "NOTSET") != "NOTSET":
        return 0, False  # padding placed by the runtime: leave such channels be
    if pinned is not None:
        # A map costs parameters and an Add: pay it only for channels that can then go.
        cols = cols[~pinned[cols]]
        if not len(cols):
            return 0, False
        new_w = const_tensor(node.inputs[1]).copy()
        new_w[:, cols] = 0
    x_dims, y_dims = static_dims(node.inputs[0], 2), static_dims(node.outputs[0], 2)
    if x_dims is None or y_dims is None:
        return None, False
    image = torch.zeros((1, w.shape[1], *x_dims), dtype=torch.float64)
    image[0, cols] = torch.from_numpy(ch.value[cols]).reshape(-1, 1, 1)
    pads = list(attr_value(node, "pads", [0, 0, 0, 0]))
    padded = torch.nn.functional.pad(image, (pads[1], pads[3], pads[0], pads[2]))
    out = torch.nn.functional.conv2d(
        padded, torch.from_numpy(w), stride=list(attr_value(node, "strides", [1, 1])),
        dilation=list(attr_value(node, "dilations", [1, 1])))[0].numpy()
    if list(out.shape[1:]) != y_dims:
        return 0, False  # shapes we cannot reproduce: leave the channels be
    set_const(graph, node, 1, new_w)
    flat = out.reshape(out.shape[0], -1)
    if np.all(flat == flat[:, :1]):
        _add_to_bias(graph, node, flat[:, 0].astype(dtype))
        return len(cols), False
    _add_after(graph, node, out.astype(dtype))
    return len(cols), True


def _fold_gemm(graph: ir.Graph, node: ir.Node, w: np.ndarray, ch) -> int:
    if attr_value(node, "transA", 0) or w.ndim != 2 or not _bias_is_constant(node):
        return 0
    c = const_array(input_or_none(node, 2))
    if c is not None and c.size != 1 and (c.ndim == 2 and c.shape[0] != 1):
        return 0  # a C that adds per row (M, 1), not per output column
    beta = float(attr_value(node, "beta", 1.0))
    if beta == 0:
        return 0
    wt = w.T if attr_value(node, "transB", 0) else w  # (in, out)
    cols = np.nonzero((ch.state == CONSTANT) & (np.abs(wt).sum(1) > 0))[0]
    if not len(cols):
        return 0
    shift = float(attr_value(node, "alpha", 1.0)) * (ch.value[cols] @ wt[cols]) / beta
    new_wt = wt.copy()
    new_wt[cols] = 0
    dtype = const_tensor(node.inputs[1]).dtype
    set_const(graph, node, 1, new_wt.T if attr_value(node, "transB", 0) else new_wt)
    _add_to_bias(graph, node, shift.astype(dtype))
    return len(cols)


def _fold_matmul(graph: ir.Graph, node: ir.Node, w: np.ndarray, ch) -> int:
    """x[..., K] @ W[K, N] with constant features: their share is the same at every position, added to
    the bias Add that follows (a Linear's) or, where there is none to own, by a new Add."""
    x = node.inputs[0]
    if w.ndim != 2 or len(ch) != w.shape[0] or x.shape is None or channel_axis(x) != len(x.shape) - 1:
        return 0  # the states are of another axis than the one the weight reads
    cols = np.nonzero((ch.state == CONSTANT) & (np.abs(w).sum(1) > 0))[0]
    if not len(cols):
        return 0
    dtype = const_tensor(node.inputs[1]).dtype
    shift = (ch.value[cols] @ w[cols]).astype(dtype)
    new_w = w.copy()
    new_w[cols] = 0
    set_const(graph, node, 1, new_w)
    y = node.outputs[0]
    readers = list(y.uses())
    bias_add = readers[0].node if len(readers) == 1 and not y.is_graph_output() else None
    if bias_add is not None and bias_add.op_type == "Add" and len(bias_add.inputs) == 2:
        k = 1 - readers[0].idx
        b = const_tensor(bias_add.inputs[k])
        if b is not None and b.shape[-1:] == shift.shape and y.shape is not None and b.ndim <= len(y.shape) \
                and all(d == 1 for d in b.shape[:-1]):
            set_const(graph, bias_add, k, b + shift.astype(b.dtype))
            return len(cols)
    _add_after(graph, node, shift)
    return len(cols)


def _bias_is_constant(node: ir.Node) -> bool:
    b = input_or_none(node, 2)
    return b is None or const_tensor(b) is not None


def _add_to_bias(graph: ir.Graph, node: ir.Node, shift: np.ndarray) -> None:
    b_value = input_or_none(node, 2)
    if b_value is not None:
        b = const_tensor(b_value)
        set_const(graph, node, 2, (b.reshape(-1) + shift).reshape(b.shape) if b.size == shift.size
                  else b + shift.reshape((1, -1) if b.ndim == 2 else (-1,)))
        return
    value = add_initializer(graph, f"{node.name or node.op_type}.folded_bias", np.ascontiguousarray(shift))
    node.resize_inputs(3)
    node.replace_input_with(2, value)


def _add_after(graph: ir.Graph, node: ir.Node, bias_map: np.ndarray) -> None:
    """y -> y + map, the map broadcast over the batch; readers of y now read the sum."""
    y = node.outputs[0]
    name = y.name
    total = ir.Value(name=f"{name}.with_constants", shape=y.shape, type=y.type)
    y.replace_all_uses_with(total, replace_graph_outputs=True)
    const = add_initializer(graph, f"{node.name or name}.constant_map", bias_map)
    add = ir.Node("", "Add", [y, const], outputs=[total], name=f"{node.name or name}.add_constant_map")
    graph.insert_after(node, add)
    y.name, total.name = f"{name}.conv", name  # the graph keeps its value (and output) names
