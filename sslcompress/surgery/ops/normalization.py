"""Normalisations over the channel axis: LayerNormalization and its relatives are walls.

A LayerNorm divides each channel by statistics (mean, variance) taken over all the channels it
normalises: deleting one, even an exactly zero one, changes the mean and the variance every other
channel is normalised by. So the width it normalises (a transformer's residual stream) is never
cut. The rule still says where the output carries its channels (the normalised, last axis), so the
layers that read it (an MLP's first MatMul) follow their own output channels.
"""

from __future__ import annotations

from .base import Decline, OpRule, attr_value, rank_of, register

STATISTICS = "deleting a channel changes the mean and variance it normalises every channel by"


class NormaliseLastAxes(OpRule):
    """Output 0 carries channels on the last axis; the node is a wall for the width it normalises."""

    def out_axes(self, node):
        rank = rank_of(node.outputs[0]) if node.outputs else None
        return [None if rank is None or rank < 2 else rank - 1] + [None] * (len(node.outputs) - 1)

    def couple(self, node, ids, ctx):
        rank = rank_of(node.inputs[0]) if node.inputs else None
        axis = int(attr_value(node, "axis", -1))
        what = "the last axis" if rank is None or axis % rank == rank - 1 else f"axes {axis} and on"
        return Decline(f"it normalises over {what}: {STATISTICS}")


register("LayerNormalization", opsets=(17, None))(NormaliseLastAxes)
register("SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
         domain="com.microsoft")(NormaliseLastAxes)
register("RMSNormalization", opsets=(23, None))(NormaliseLastAxes)
