"""Pooling and reductions over space: each channel pooled on its own.

A constant channel stays constant through max pooling (padding never wins a max) and through
global and spatial-reduction pools; average pooling that counts zero padding makes the border
differ. LRN across channels mixes neighbours, whose order deleting a channel would change: it
keeps zeros zero but is a wall for deletion.
"""

from __future__ import annotations

import numpy as np

from .base import (
    CONSTANT,
    ZERO,
    Channels,
    Decline,
    OpRule,
    PassThrough,
    attr_value,
    channel_axis,
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


@register("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum")
class ReduceSpace(PassThrough):
    """A reduction that leaves the batch and channel axes alone (spatial axes, wherever the
    channels run)."""

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

    def out_axes(self, node):
        axes, ch = self._axes(node), channel_axis(node.inputs[0])
        if axes is None or ch is None or attr_value(node, "keepdims", 1):
            return [ch]
        return [ch - sum(a < ch for a in axes)]

    def _factor(self, node) -> float | None:
        """ReduceSum multiplies a constant by the number of positions summed."""
        if node.op_type != "ReduceSum":
            return 1.0
        shape = node.inputs[0].shape
        axes = attr_value(node, "axes", None)
        if axes is None:
            axes = [int(a) for a in np.atleast_1d(const_array(node.inputs[1]))]
        dims = [shape[a % len(shape)] for a in axes]
        return float(np.prod(dims)) if all(isinstance(d, int) for d in dims) else None

    def forward(self, node, ins):
        x = ins[0]
        if x is None or not self._ok(node):
            return [None]
        f = self._factor(node)
        if f is None:
            return [x.with_live(x.state == CONSTANT)]
        return [Channels.known(x.known_values * f).with_live(~x.is_known)]

    def couple(self, node, ids, ctx):
        if not self._ok(node):
            axes = self._axes(node)
            if node.op_type == "ReduceMean" and axes is not None and channel_axis(node.inputs[0]) in axes:
                # The statistics of a LayerNorm written out (ReduceMean, Sub, Pow, Sqrt, Div).
                return Decline("it averages over the channel axis (a normalisation's statistics): deleting a "
                               "channel changes the mean and variance")
            return Decline("it reduces over the batch or channel axis")
        return super().couple(node, ids, ctx)


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
