"""The pass that shrinks kernels whose outer rows or columns are zero across all filters.

Dropping kernel row 0 of a Conv moves every tap one step down (one dilation step, in general),
which one row less of top padding undoes exactly; where there is no padding left to give back,
a Slice that crops the input's first row does the same. The last row likewise at the bottom.
So a 3x3 kernel becomes 3x2, 2x2, 1x3 or 1x1 and computes the same output. A 1-D Conv's taps are columns
of one row: a kernel of 5 becomes 3 or 1 the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .ops.base import const_tensor, quant_blocker, take_const
from .ops.quant import activation_dequantize, dequantize_again, splits_a_signed_pair


@dataclass(frozen=True)
class ShrinkResult:
    shrunk: dict[str, tuple[tuple[int, int], tuple[int, int]]]  # node -> (kernel before, kernel after)


def shrink_kernels(model: ir.Model) -> ShrinkResult:
    """Shrink the kernels of the model's Convs, in place."""
    shrunk = {}
    for node in list(model.graph):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        w_value = node.inputs[1]
        # An initializer, or a quantized one (DequantizeLinear of initializers), read by this Conv alone.
        quantized = not w_value.is_initializer()
        if quantized and (quant_blocker(w_value) is not None or not _of_initializers(w_value)):
            continue
        if len(w_value.uses()) != 1:
            continue
        if node.attributes.get("auto_pad") is not None and node.attributes["auto_pad"].value not in ("NOTSET",):
            continue
        w = const_tensor(w_value)
        if w is None or w.ndim not in (3, 4):
            continue
        one_row = w.ndim == 3  # a 1-D Conv: a 2-D one of one row, whose taps are its columns
        pads = list(node.attributes["pads"].value) if "pads" in node.attributes else [0] * (2 * w.ndim - 4)
        dil = list(node.attributes["dilations"].value) if "dilations" in node.attributes else [1] * (w.ndim - 2)
        if one_row:
            w, pads, dil = w[:, :, None, :], [0, pads[0], 0, pads[1]], [1, dil[0]]
        r0, r1, c0, c1 = 0, w.shape[2], 0, w.shape[3]
        rows = np.abs(w).sum((0, 1, 3)) > 0
        cols = np.abs(w).sum((0, 1, 2)) > 0
        if not rows.any():
            continue  # an all-zero kernel is the channel passes' business
        while r1 - r0 > 1 and not rows[r0]:
            r0 += 1
        while r1 - r0 > 1 and not rows[r1 - 1]:
            r1 -= 1
        while c1 - c0 > 1 and not cols[c0]:
            c0 += 1
        while c1 - c0 > 1 and not cols[c1 - 1]:
            c1 -= 1
        if (r0, r1, c0, c1) == (0, w.shape[2], 0, w.shape[3]):
            continue
        # Each dropped row/column takes one dilation step of padding, then of input, from its side.
        shifts = [r0 * dil[0], c0 * dil[1], (w.shape[2] - r1) * dil[0], (w.shape[3] - c1) * dil[1]]
        new_pads = [max(p - s_, 0) for p, s_ in zip(pads, shifts, strict=True)]
        crops = [max(s_ - p, 0) for p, s_ in zip(pads, shifts, strict=True)]
        if any(crops):
            dq = activation_dequantize(node.inputs[0])
            if dq is not None and splits_a_signed_pair(dq):
                continue  # a Slice inside an int8 Q -> DQ pair would change how the runtime fuses it
            _crop_input(model.graph, node, crops, one_row)
        if one_row:
            take_const(model.graph, node, 1, lambda a, k=(c0, c1): a[:, :, k[0]:k[1]])
            node.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", [c1 - c0])
            node.attributes["pads"] = ir.AttrInt64s("pads", [new_pads[1], new_pads[3]])
        else:
            take_const(model.graph, node, 1, lambda a, k=(r0, r1, c0, c1): a[:, :, k[0]:k[1], k[2]:k[3]])
            node.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", [r1 - r0, c1 - c0])
            node.attributes["pads"] = ir.AttrInt64s("pads", new_pads)
        shrunk[node.name or node.outputs[0].name] = ((w.shape[2], w.shape[3]), (r1 - r0, c1 - c0))
    return ShrinkResult(shrunk)


_BIG = np.iinfo(np.int64).max


def _crop_input(graph: ir.Graph, node: ir.Node, crops: list[int], one_row: bool = False) -> None:
    """Insert Slice(input)[:, :, top:-bottom, left:-right] in front of this Conv alone ([:, :, left:-right] for
    a 1-D one)."""
    top, left, bottom, right = crops
    base = node.name or node.outputs[0].name
    starts, ends = [top, left], [-bottom if bottom else _BIG, -right if right else _BIG]
    axes = [2] if one_row else [2, 3]
    consts = {
        "starts": np.array(starts[-len(axes):], np.int64),
        "ends": np.array(ends[-len(axes):], np.int64),
        "axes": np.array(axes, np.int64),
    }
    values = []
    for key, arr in consts.items():
        v = ir.Value(name=f"{base}.crop_{key}", shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(arr, name=f"{base}.crop_{key}"))
        graph.register_initializer(v)
        values.append(v)
    x = node.inputs[0]
    dq = activation_dequantize(x)  # a quantized input: crop the quantized tensor, then dequantize
    crop = ir.Node("", "Slice", [dq.inputs[0] if dq else x, *values], name=f"{base}.crop", num_outputs=1)
    crop.outputs[0].name = f"{base}.cropped"
    graph.insert_before(node, crop)
    if dq is not None:
        crop.outputs[0].type = dq.inputs[0].type
        dequantize_again(graph, node, 0, dq, crop.outputs[0])
    else:
        node.replace_input_with(0, crop.outputs[0])


def _of_initializers(value: ir.Value) -> bool:
    """A value made by QuantizeLinear/DequantizeLinear nodes from initializers alone."""
    node = value.producer()
    if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
        return value.is_initializer()
    return all(v is None or _of_initializers(v) for v in node.inputs)
