"""QuantizeLinear and DequantizeLinear (ONNX and com.microsoft): the QDQ pairs of quantized models.

On an activation they act channel by channel, so channels pass through them: QuantizeLinear maps a
known channel value v to saturate(round(v / scale) + zero point) (a number of the quantized type),
DequantizeLinear maps q to (q - zero point) * scale. A ZERO channel therefore stays ZERO through a
Q -> DQ pair, whatever the zero point. A scale and zero point of one value per tensor stay as they
are; per-channel ones (``axis`` on the channel axis) lose the deleted channels' entries.

Where a node cannot be read exactly it declines, with the reason in the report: a per-channel
scale along another axis than the channels, block quantization (``block_size``), or a type other
than (u)int8, (u)int16 and int32 (int4, float8...).

A QuantizeLinear/DequantizeLinear of constants (a quantized weight) has no channels: its output is
a constant, which ``const_tensor`` reads as the float values and ``take_const`` slices in the
quantized tensor (ops/base.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import (
    SLICEABLE_QUANT,
    Channels,
    Decline,
    PassThrough,
    channel_axis,
    channel_count,
    const_tensor,
    dequantize,
    is_qdq,
    quantization,
    quantize,
    rank_of,
    refine_shape,
    register,
    take_const,
)


class QuantizeDequantize(PassThrough):
    """QuantizeLinear / DequantizeLinear on an activation: channel c of the output is channel c of x."""

    def fill_shapes(self, node):
        # The input's shape, not its type (ONNX shape inference does not know the com.microsoft ones).
        x, y = node.inputs[0], node.outputs[0]
        if x is not None and x.shape is not None:
            refine_shape(y, list(x.shape))

    def _constant(self, node) -> bool:
        return bool(node.inputs) and const_tensor(node.inputs[0]) is not None

    def out_axes(self, node):
        if self._constant(node):
            return [None] * len(node.outputs)  # a quantized weight: a constant, no channels
        return super().out_axes(node)

    def blocker(self, node) -> str | None:
        """Why this node's channels cannot be followed exactly; None when they can."""
        x = node.inputs[0] if node.inputs else None
        p = quantization(node, rank_of(x))
        if p is None:
            return "its scale or zero point is computed at run time, or its axis is unknown"
        if p.qtype not in SLICEABLE_QUANT:
            name = getattr(p.qtype, "name", str(p.qtype))
            return f"it quantizes to {name}, which the surgery does not read"
        if p.block_size:
            return f"blocked quantization (block_size {p.block_size})"
        if p.axis is not None:
            axis, n = channel_axis(x), channel_count(x)
            if p.scale.ndim != 1 or axis != p.axis or n != p.scale.size:
                where = "no channel axis" if axis is None else f"the channel axis {axis}"
                return f"its per-channel scale runs along axis {p.axis}, not {where}"
        return None

    def forward(self, node, ins):
        x = ins[0] if ins else None
        if x is None or self._constant(node) or self.blocker(node) is not None:
            return [None] * len(node.outputs)
        p = quantization(node, rank_of(node.inputs[0]))
        n = len(x)
        # One entry per channel: a (n,)-shaped tensor whose channel axis is 0.
        per = type(p)(p.scale.reshape(-1), None if p.zero_point is None else p.zero_point.reshape(-1),
                      None if p.axis is None else 0, 0, p.qtype)
        values = np.where(x.is_known, np.nan_to_num(x.value), 0.0)
        if node.op_type == "QuantizeLinear":
            out = quantize(values.astype(np.float32), per).astype(np.float64)
        else:
            out = dequantize(np.rint(values).astype(np.int64), per).astype(np.float64)
        assert out.shape == (n,)
        return [Channels.known(out).with_live(~x.is_known)] + [None] * (len(node.outputs) - 1)

    def couple(self, node, ids, ctx):
        if self._constant(node):
            return [None] * len(node.outputs)
        why = self.blocker(node)
        if why is not None:
            return Decline(why)
        return super().couple(node, ids, ctx)

    def rewrite(self, graph, node, keep_in, keep_out):
        keep = keep_out[0]
        if keep is None or keep.all() or self._constant(node):
            return False
        p = quantization(node, rank_of(node.inputs[0]))
        if p is None or p.axis is None:
            return False  # one scale for the whole tensor: nothing to slice
        for i in (1, 2):
            if len(node.inputs) > i and node.inputs[i] is not None:
                take_const(graph, node, i, lambda a: a[keep])
        return True


for _domain in ("", "com.microsoft"):
    register("QuantizeLinear", "DequantizeLinear", domain=_domain)(QuantizeDequantize)


# ---- For passes that put a node in front of a layer (a crop, a gather of features): in a QDQ model
# the layer reads DequantizeLinear directly, and runtimes fuse that pair into one quantized kernel.
# The new node then goes in front of the DequantizeLinear, on the quantized tensor.

def activation_dequantize(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear of a tensor computed at run time that makes ``value``, when its scale is
    one for the tensor or runs along axis 1; None otherwise."""
    node = value.producer() if value is not None else None
    if not is_qdq(node) or node.op_type != "DequantizeLinear" or const_tensor(node.inputs[0]) is not None:
        return None
    p = quantization(node, rank_of(node.inputs[0]))
    if p is None or p.block_size or (p.axis is not None and (p.axis != 1 or p.scale.ndim != 1)):
        return None
    return node


def splits_a_signed_pair(dq: ir.Node) -> bool:
    """Whether a node put between ``dq`` and the QuantizeLinear that makes its input would split an int8
    Q -> DQ pair. ONNX Runtime rewrites such adjacent pairs to uint8 before it fuses QDQ groups, so a
    split pair changes how the ops around it are fused (a QLinearSoftmax upstream becomes float
    Softmax -> QuantizeLinear), and the model no longer rounds as it did."""
    q = dq.inputs[0].producer() if dq.inputs and dq.inputs[0] is not None else None
    if not is_qdq(q) or q.op_type != "QuantizeLinear":
        return False
    p = quantization(dq, rank_of(dq.inputs[0]))
    return p is None or p.qtype == ir.DataType.INT8


def dequantize_again(graph: ir.Graph, reader: ir.Node, index: int, dq: ir.Node, q: ir.Value,
                     keep: np.ndarray | None = None) -> None:
    """Input ``index`` of ``reader`` becomes a copy of ``dq`` that reads ``q`` (the quantized tensor after
    a crop or gather); ``keep`` picks the entries of a per-channel scale and zero point along axis 1.
    The original goes when nothing else reads it."""
    old = dq.outputs[0]
    taken = {v.name for n in graph for v in n.outputs} | set(graph.initializers)
    name, i = f"{q.name}.dequantized", 1
    while name in taken:
        name, i = f"{q.name}.dequantized.{i}", i + 1
    copy = ir.Node(dq.domain, dq.op_type, [q, *dq.inputs[1:]],
                   [ir.Attr(a.name, a.type, a.value) for a in dq.attributes.values()],
                   num_outputs=1, version=dq.version, name=name)
    copy.outputs[0].name = name
    copy.outputs[0].type = old.type
    copy.outputs[0].shape = q.shape
    graph.insert_before(reader, copy)
    reader.replace_input_with(index, copy.outputs[0])
    p = quantization(copy, rank_of(q))
    if keep is not None and p is not None and p.axis == 1:
        for j in (1, 2):
            if len(copy.inputs) > j and copy.inputs[j] is not None:
                take_const(graph, copy, j, lambda a: a[keep])
    if not old.uses() and not old.is_graph_output():
        graph.remove(dq, safe=True)
