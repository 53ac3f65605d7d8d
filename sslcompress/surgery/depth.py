"""The pass that deletes residual branches whose output is exactly zero (depth-wise SSL).

Where one operand of an Add is ZERO in every channel (and has the Add's own shape, so nothing
depends on its broadcasting), the Add is the other operand: its users are rewired to it, the
Add goes, and every node whose outputs no one reads any more (the branch) goes with it.

In a quantized (QDQ) model an Add whose sum is requantized (a QuantizeLinear reads it, directly
or through Relu/Clip) stays: runtimes fuse DequantizeLinear -> Add -> QuantizeLinear into one
integer kernel (ONNX Runtime's QLinearAdd) whose rounding is not the float path's, so the sum
without the Add can differ from it by a quantization step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from .analysis import Analysis, analysis_of
from .channels import ZERO


@dataclass(frozen=True)
class DepthResult:
    branches_removed: tuple[str, ...]  # names of the Add nodes bypassed
    nodes_removed: int
    branches_kept: dict[str, str] = field(default_factory=dict)  # Add with a zero operand that stays -> why


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and list(a.shape) == list(b.shape)


def remove_zero_branches(model: ir.Model, analysis: Analysis | None = None) -> DepthResult:
    """Bypass the Adds whose one operand is ZERO throughout, in place."""
    analysis = analysis_of(model, analysis)
    states = analysis.states
    removed: list[str] = []
    kept: dict[str, str] = {}
    n_before = len(list(model.graph))
    for node in list(model.graph):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        for zero_side in (0, 1):
            z, keep = node.inputs[zero_side], node.inputs[1 - zero_side]
            ch = states.get(z) if z is not None else None
            if ch is None or not np.all(ch.state == ZERO):
                continue
            if _requantized(out):
                kept[node.name or out.name] = ("a quantized Add (its sum is requantized): without it the runtime "
                                                "would round the sum differently")
                continue
            if not _same_shape(z, out) or not _same_shape(keep, out):
                kept[node.name or out.name] = "its operands' shapes cannot be shown equal to the sum's"
                continue
            out.replace_all_uses_with(keep)
            model.graph.remove(node, safe=True)
            removed.append(node.name or out.name)
            break
    if removed:
        analysis.invalidate()
        # The branch that fed the bypassed Add: every node no output needs any more, and its constants.
        common.RemoveUnusedNodesPass()(model)
    return DepthResult(tuple(removed), n_before - len(list(model.graph)),
                       {k: v for k, v in kept.items() if k not in removed})


_CLAMPS = ("Relu", "Clip")  # what a runtime folds into the requantization that follows


def _requantized(value: ir.Value) -> bool:
    """A QuantizeLinear reads ``value``, directly or through Relu/Clip."""
    for node, _ in value.uses():
        if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx", "com.microsoft"):
            return True
        if node.op_type in _CLAMPS and node.domain in ("", "ai.onnx") and _requantized(node.outputs[0]):
            return True
    return False
