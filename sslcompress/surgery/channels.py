"""Forward channel analysis of an ONNX graph: which channels are exactly zero or constant.

For every value with a channel axis (wherever the layout analysis found it), each channel is ZERO,
CONSTANT(value) or LIVE, propagated from the weights through the graph by the op rules (ops/). An
op without a rule is a wall (every channel it writes is LIVE), so an unknown op is never taken for
an elementwise one. The states are facts about every input: the rewrite passes may delete ZERO
channels and fold CONSTANT ones.
"""

from __future__ import annotations

import onnx_ir as ir

from .axes import assign_channel_axes, reads_on_its_axis
from .ops import CONSTANT, LIVE, ZERO, Channels, attr_value, channel_count, const_array, handled_ops, rule_for
from .ops.base import const_tensor

__all__ = ["CONSTANT", "LIVE", "ZERO", "Channels", "analyze", "attr_value", "channel_count", "const_array",
           "handled_ops"]


def analyze(model: ir.Model) -> dict[ir.Value, Channels]:
    """Channel states of every value with a channel axis."""
    assign_channel_axes(model)
    states: dict[ir.Value, Channels] = {}

    def of(v: ir.Value | None) -> Channels | None:
        if v is None:
            return None
        if v in states:
            return states[v]
        if const_tensor(v) is not None:
            return None  # initializers and Constant nodes are read by the rules themselves
        n = channel_count(v)
        return Channels.live(n) if n is not None else None

    for node in model.graph:  # onnx_ir iterates in topological order for a valid model
        rule = rule_for(node)
        fits = reads_on_its_axis(rule, node)
        ins = [of(v) if ok else None for v, ok in zip(node.inputs, fits, strict=True)]
        outs = rule.forward(node, ins) if rule is not None else [None] * len(node.outputs)
        for v, ch in zip(node.outputs, outs, strict=False):
            n = channel_count(v)
            if n is None:
                continue
            if ch is None or len(ch) != n:
                ch = Channels.live(n)
            states[v] = ch
    return states
