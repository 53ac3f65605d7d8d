"""Pooling and reductions over space: each channel pooled on its own.

A constant channel stays constant through max pooling (padding never wins a max) and through
global and spatial-reduction pools; average pooling that counts zero padding makes the border
differ. A sum, mean or norm over the channel axis adds nothing for a ZERO channel, so such a
channel may go (a mean then keeps dividing by the count it had). LRN across channels mixes
neighbours, whose order deleting a channel would change: it keeps zeros zero but is a wall for
deletion.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import (
    AXIS_KEY,
    CONSTANT,
    ZERO,
    Channels,
    Decline,
    OpRule,
    PassThrough,
    add_initializer,
    attr_value,
    channel_axis,
    channel_count,
    const_array,
    input_or_none,
    rank_of,
    register,
)


@register("MaxPool", "GlobalAveragePool", "GlobalMaxPool")
class Pool(PassThrough):
    def in_axes(self, node):
        return [1]

    def forward(self, node, ins):
        return [ins[0]] + [None] * (len(node.outputs) - 1)

    def couple(self, node, ids, ctx):
        if any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[1:]):
            return Decline("its indices, which count positions across channels, are read")
        return super().couple(node, ids, ctx)


@register("AveragePool")
class AveragePool(PassThrough):
    def in_axes(self, node):
        return [1]

    def forward(self, node, ins):
        x = ins[0]
        pads = attr_value(node, "pads", None)
        if x is not None and attr_value(node, "count_include_pad", 0) and pads and any(pads):
            return [x.with_live(x.state == CONSTANT)]
        return [x]


# Reductions a zero channel adds nothing to: summed over the channel axis, a dead channel may go (a mean keeps
# its divisor, see ReduceSpace.rewrite).
_SUMS = ("ReduceMean", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare")


@register("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare")
class ReduceSpace(PassThrough):
    """A reduction that leaves the batch and channel axes alone (spatial axes, wherever the
    channels run), or one that sums over the channel axis (ConvNeXt V2's global response
    normalisation: the mean over the channels of each channel's L2 norm over space). The latter
    writes no channels: it reads every channel that is not ZERO, and a ZERO one adds nothing, so
    it may go as long as a mean keeps dividing by the original count."""

    def _axes(self, node) -> list[int] | None:
        axes = attr_value(node, "axes", None)
        if axes is None and input_or_none(node, 1) is not None:
            c = const_array(node.inputs[1])
            axes = None if c is None else [int(a) for a in np.atleast_1d(c)]
        rank = rank_of(node.inputs[0])
        if not axes or rank is None:
            return None
        return sorted(int(a) % rank for a in axes)

    def _ok(self, node) -> bool:
        axes, ch = self._axes(node), channel_axis(node.inputs[0])
        return axes is not None and ch is not None and 0 not in axes and ch not in axes

    def _over_channels(self, node) -> bool:
        """A sum (or mean, or norm) over the channel axis and maybe space, never the batch; not a mean its own
        input is centred by (a LayerNorm written out, a wall that says why: no channel of x - mean is zero)."""
        axes, ch = self._axes(node), channel_axis(node.inputs[0])
        return node.op_type in _SUMS and axes is not None and ch is not None and 0 not in axes and ch in axes \
            and channel_count(node.inputs[0]) is not None and not _centres(node)

    def out_axes(self, node):
        axes, ch = self._axes(node), channel_axis(node.inputs[0])
        if self._over_channels(node):
            return [None]  # a statistic across the channels, the same for every channel it broadcasts onto
        if axes is None or ch is None or attr_value(node, "keepdims", 1):
            return [ch]
        return [ch - sum(a < ch for a in axes)]

    def _positions(self, node) -> float | None:
        """How many positions each channel reduces over, where known."""
        shape = node.inputs[0].shape
        axes = self._axes(node)
        dims = [shape[a] for a in axes] if axes is not None else [None]
        return float(np.prod(dims)) if all(isinstance(d, int) for d in dims) else None

    def _of_constant(self, node, values: np.ndarray) -> np.ndarray | None:
        """What the reduction writes for a channel that holds one value everywhere."""
        if node.op_type in ("ReduceMean", "ReduceMax", "ReduceMin"):
            return values
        n = self._positions(node)
        if n is None:
            return None
        return {"ReduceSum": values * n, "ReduceL1": np.abs(values) * n, "ReduceL2": np.abs(values) * np.sqrt(n),
                "ReduceSumSquare": values * values * n}[node.op_type]

    def forward(self, node, ins):
        x = ins[0]
        if x is None or not self._ok(node):
            return [None]
        vals = self._of_constant(node, x.known_values)
        if vals is None:
            return [x.with_live(x.state == CONSTANT)]
        return [Channels.known(vals).with_live(~x.is_known)]

    def couple(self, node, ids, ctx):
        if self._over_channels(node):
            return [None]  # no channels out; what it reads it needs unless ZERO (backward), and is not pinned
        if not self._ok(node):
            axes = self._axes(node)
            if node.op_type == "ReduceMean" and axes is not None and channel_axis(node.inputs[0]) in axes:
                # The statistics of a LayerNorm written out (ReduceMean, Sub, Pow, Sqrt, Div).
                return Decline("it averages over the channel axis (a normalisation's statistics): deleting a "
                               "channel changes the mean and variance")
            return Decline("it reduces over the batch or channel axis")
        return super().couple(node, ids, ctx)

    def backward(self, node, needed, ins):
        if self._over_channels(node):
            return [None] + [None] * (len(node.inputs) - 1)  # every channel that is not ZERO
        return super().backward(node, needed, ins)

    def rewrite(self, graph, node, keep_in, keep_out):
        """A mean over the channels that loses some (ZERO) ones keeps dividing by the count it had: its
        output is multiplied by kept / total (a sum needs nothing, the dead channels added zero)."""
        keep = keep_in[0] if keep_in else None
        if node.op_type != "ReduceMean" or keep is None or keep.all() or not self._over_channels(node):
            return False
        out = node.outputs[0]
        dtype = out.type.dtype.numpy() if out.type is not None else np.float32
        factor = add_initializer(graph, f"{out.name}.kept_fraction", np.array(keep.sum() / len(keep), dtype))
        name = out.name
        scaled = ir.Value(name=f"{name}.scaled", shape=out.shape, type=out.type)
        scaled.meta[AXIS_KEY] = out.meta.get(AXIS_KEY)
        mul = ir.Node("", "Mul", [None, factor], outputs=[scaled], name=f"{out.name}.original_count")
        out.replace_all_uses_with(scaled, replace_graph_outputs=True)
        mul.replace_input_with(0, out)
        graph.insert_after(node, mul)
        out.name, scaled.name = f"{name}.kept_channels", name  # readers (and outputs) keep the name
        return True


def _centres(node) -> bool:
    """Whether the reduction's input has its output subtracted from it (x - mean(x))."""
    x, out = node.inputs[0], node.outputs[0]
    return any(use.op_type == "Sub" and list(use.inputs[:2]) == [x, out] for use, _ in out.uses())


@register("LRN")
class LRN(OpRule):
    def in_axes(self, node):
        return [1]

    def forward(self, node, ins):
        x = ins[0]
        if x is None:
            return [None]
        return [Channels.known(np.zeros(len(x))).with_live(x.state != ZERO)]

    def couple(self, node, ids, ctx):
        return Decline("it mixes neighbouring channels, whose order deleting one would change")
