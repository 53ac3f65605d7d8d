"""Normalisations over the channel axis: LayerNormalization and its relatives are walls.

A LayerNorm divides each channel by statistics (mean, variance) taken over all the channels it
normalises: deleting one, even an exactly zero one, changes the mean and the variance every other
channel is normalised by. So the width it normalises (a transformer's residual stream) is never
cut. The rule still says where the output carries its channels (the normalised, last axis), so the
layers that read it (an MLP's first MatMul) follow their own output channels.
"""

from __future__ import annotations

import numpy as np

from .base import Channels, Decline, OpRule, attr_value, const_array, input_or_none, rank_of, register

STATISTICS = "deleting a channel changes the mean and variance it normalises every channel by"


class NormaliseLastAxes(OpRule):
    """Output 0 carries channels on the last axis; the node is a wall for the width it normalises."""

    # Where the scale and shift are (None: none), for the ops whose output is normalised * scale + shift.
    affine_inputs: tuple[int, int | None] | None = None

    def out_axes(self, node):
        rank = rank_of(node.outputs[0]) if node.outputs else None
        return [None if rank is None or rank < 2 else rank - 1] + [None] * (len(node.outputs) - 1)

    def forward(self, node, ins):
        """With every channel's scale zero, the output is the shift whatever the input (the normalised value is
        finite): a branch that ends in a LayerNorm with zero scale and shift (Swin V2's post-norm blocks) is
        ZERO, so the depth pass removes it as the training counted. A few zero scales change nothing: the
        width is the norm's, which no cut touches, so their channels stay LIVE (folding them would only add
        an Add)."""
        outs: list[Channels | None] = [None] * len(node.outputs)
        rank = rank_of(node.inputs[0]) if node.inputs else None
        if self.affine_inputs is None or rank is None or int(attr_value(node, "axis", -1)) % rank != rank - 1:
            return outs
        at_scale, at_shift = self.affine_inputs
        scale = const_array(input_or_none(node, at_scale))
        shift = const_array(input_or_none(node, at_shift)) if at_shift is not None else None
        if shift is None and at_shift is not None and input_or_none(node, at_shift) is not None:
            return outs  # a shift computed at run time
        if scale is None or scale.ndim != 1 or np.any(scale != 0) or (shift is not None and shift.shape != scale.shape):
            return outs
        outs[0] = Channels.known(np.zeros_like(scale) if shift is None else shift)
        return outs

    def couple(self, node, ids, ctx):
        rank = rank_of(node.inputs[0]) if node.inputs else None
        axis = int(attr_value(node, "axis", -1))
        what = "the last axis" if rank is None or axis % rank == rank - 1 else f"axes {axis} and on"
        return Decline(f"it normalises over {what}: {STATISTICS}")


class LayerNormalization(NormaliseLastAxes):
    affine_inputs = (1, 2)


class RMSNormalization(NormaliseLastAxes):
    affine_inputs = (1, None)


register("LayerNormalization", opsets=(17, None))(LayerNormalization)
register("SimplifiedLayerNormalization", domain="com.microsoft")(RMSNormalization)
register("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain="com.microsoft")(NormaliseLastAxes)
register("RMSNormalization", opsets=(23, None))(RMSNormalization)
