"""Ops that move the channel axis: Transpose, Squeeze and Unsqueeze.

Channels are not tied to axis 1: a Transpose carries them to wherever its permutation puts
them (the NHWC stretches that TensorFlow converters write), and Squeeze/Unsqueeze shift them
as axes come and go. Each channel stays itself, so these ops pass ids, states and needs along.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import (
    Decline,
    PassThrough,
    add_initializer,
    attr_value,
    channel_axis,
    const_tensor,
    input_or_none,
    opset_of,
    rank_of,
    register,
)


class Move(PassThrough):
    """Output channel c is input channel c; only the axis that carries them changes."""

    def out_axis(self, node) -> int | None:
        raise NotImplementedError

    def out_axes(self, node):
        return [self.out_axis(node)]

    def forward(self, node, ins):
        return [ins[0] if self.out_axis(node) is not None else None]

    def couple(self, node, ids, ctx):
        if self.out_axis(node) is None:
            return Decline("it removes or hides the channel axis")
        return super().couple(node, ids, ctx)


@register("Transpose")
class Transpose(Move):
    def out_axis(self, node):
        a, rank = channel_axis(node.inputs[0]), rank_of(node.inputs[0])
        if a is None or rank is None:
            return None
        perm = attr_value(node, "perm", None)
        perm = list(range(rank))[::-1] if perm is None else [int(p) for p in perm]
        out = perm.index(a) if a in perm else None
        return out if out not in (None, 0) else None


def _axes(node) -> list[int] | None:
    axes = attr_value(node, "axes", None)
    if axes is None and input_or_none(node, 1) is not None:
        c = const_tensor(node.inputs[1])
        axes = None if c is None else [int(x) for x in np.atleast_1d(c)]
    return None if axes is None else [int(x) for x in axes]


@register("Unsqueeze")
class Unsqueeze(Move):
    def out_axis(self, node):
        a, out_rank = channel_axis(node.inputs[0]), rank_of(node.outputs[0])
        axes = _axes(node)
        if a is None or out_rank is None or axes is None:
            return None
        inserted = {x % out_rank for x in axes}
        kept = [i for i in range(out_rank) if i not in inserted]
        return kept[a] if a < len(kept) and kept[a] != 0 else None


@register("Squeeze")
class Squeeze(Move):
    def out_axis(self, node):
        x = node.inputs[0]
        a, rank = channel_axis(x), rank_of(x)
        if a is None or rank is None:
            return None
        axes = _axes(node)
        if axes is None:  # every axis of size 1 goes: only readable with a static shape
            if any(not isinstance(d, int) for d in x.shape):
                return None
            axes = [i for i, d in enumerate(x.shape) if d == 1]
        removed = {i % rank for i in axes}
        if a in removed:
            return None
        out = a - sum(r < a for r in removed)
        return out if out > 0 else None

    def couple(self, node, ids, ctx):
        x = node.inputs[0]
        if _axes(node) is None and x is not None and x.shape is not None and 1 not in list(x.shape):
            # Nothing to squeeze now, and no axes to write: an empty list squeezes every size 1 too.
            return Decline("without axes it would squeeze a channel axis cut down to one channel")
        return super().couple(node, ids, ctx)

    def rewrite(self, graph, node, keep_in, keep_out):
        """Without axes, Squeeze drops every axis of size 1 it finds at run time: a channel axis cut down
        to one channel would go too. The axes it drops now (the shapes are still the uncut ones here)
        are written out."""
        x = node.inputs[0]
        if _axes(node) is not None or x is None or x.shape is None:
            return False
        axes = [i for i, d in enumerate(x.shape) if d == 1]
        version = opset_of(node)
        if version is not None and version < 13:
            node.attributes["axes"] = ir.AttrInt64s("axes", axes)
        else:
            node.resize_inputs(2)
            node.replace_input_with(1, add_initializer(graph, f"{node.name or 'squeeze'}.axes",
                                                       np.array(axes, np.int64)))
        return True
