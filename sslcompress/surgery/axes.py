"""Layout analysis: which axis of each value carries channels.

The op rules say it (Conv writes them on axis 1, a MatMul by a constant weight on the last axis,
a Transpose wherever its permutation puts them, elementwise ops where their operand has them);
the answer is stored on each value (``ir.Value.meta``) for the analyses and rules that follow.
Graph inputs and values no rule speaks for carry them on axis 1.
"""

from __future__ import annotations

import onnx_ir as ir

from .ops import rule_for
from .ops.base import AXIS_KEY


def assign_channel_axes(model: ir.Model) -> None:
    """Store each value's channel axis, in topological order (an analysis: the graph is unchanged)."""
    for v in model.graph.inputs:
        v.meta.pop(AXIS_KEY, None)
    for node in model.graph:
        rule = rule_for(node)
        if rule is not None:
            rule.fill_shapes(node)
        axes = rule.out_axes(node) if rule is not None else [1] * len(node.outputs)
        for v, axis in zip(node.outputs, axes, strict=False):
            if axis is None:
                v.meta[AXIS_KEY] = -1  # no channel axis
            else:
                v.meta[AXIS_KEY] = axis


def reads_on_its_axis(rule, node: ir.Node) -> list[bool]:
    """Per input: True where the rule reads channels on the axis the value carries them on (or does not
    care); False where the value's channels run on another axis than the rule reads."""
    from .ops import channel_axis

    wanted = rule.in_axes(node) if rule is not None else [None] * len(node.inputs)
    out = []
    for v, want in zip(node.inputs, list(wanted) + [None] * (len(node.inputs) - len(wanted)), strict=False):
        out.append(want is None or v is None or channel_axis(v) in (None, want))
    return out
