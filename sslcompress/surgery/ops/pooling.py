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
    OpRule,
    PassThrough,
    attr_value,
    const_array,
    input_or_none,
    rank_of,
    register,
)


@register("MaxPool", "GlobalAveragePool", "GlobalMaxPool")
class Pool(PassThrough):
    def forward(self, node, ins):
        return [ins[0]] + [None] * (len(node.outputs) - 1)

    def couple(self, node, ids, ctx):
        if any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[1:]):
            return None  # MaxPool's indices count positions across channels
        return super().couple(node, ids, ctx)


@register("AveragePool")
class AveragePool(PassThrough):
    def forward(self, node, ins):
        x = ins[0]
        pads = attr_value(node, "pads", None)
        if x is not None and attr_value(node, "count_include_pad", 0) and pads and any(pads):
            return [x.with_live(x.state == CONSTANT)]
        return [x]


@register("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum")
class ReduceSpace(PassThrough):
    """A reduction over spatial axes only (never the batch or the channel axis)."""

    def _ok(self, node) -> bool:
        axes = attr_value(node, "axes", None)
        if axes is None and input_or_none(node, 1) is not None:
            c = const_array(node.inputs[1])
            axes = None if c is None else [int(a) for a in np.atleast_1d(c)]
        rank = rank_of(node.inputs[0])
        return bool(axes) and rank is not None and all(a % rank >= 2 for a in axes)

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
        return super().couple(node, ids, ctx) if self._ok(node) else None


@register("LRN")
class LRN(OpRule):
    def forward(self, node, ins):
        x = ins[0]
        if x is None:
            return [None]
        return [Channels.known(np.zeros(len(x))).with_live(x.state != ZERO)]
