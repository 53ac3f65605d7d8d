"""The pass that deletes residual branches whose output is exactly zero (depth-wise SSL), or a constant.

Where one operand of an Add is ZERO in every channel (and has the Add's own shape, so nothing
depends on its broadcasting), the Add is the other operand: its users are rewired to it, the
Add goes, and every node whose outputs no one reads any more (the branch) goes with it. A Sub
whose second operand is ZERO (a residual written ``x - branch(x)``) goes the same way; one whose
first operand is ZERO computes ``-x`` and stays.

Where that operand is instead a constant per channel, each channel one value everywhere (a branch
whose first layer's filters are all zero: its last conv reads only zeros and writes its bias), the
operand becomes that constant, shaped to broadcast along the channel axis, and the branch goes the
same way. Channel pruning alone would keep both convs one channel wide, since it never empties a
value: two ops that compute nothing and still cost their call. The constant is the value the
channel analysis derived from the weights, in the operand's own dtype.

In a float32 NCHW model the Add of that constant is written as a BatchNormalization with scale 1,
mean 0, variance 1 and epsilon 0 and the constant as its shift: the same sum, exactly (1 / sqrt(1 + 0)
is 1), in an op ONNX Runtime's blocked (NCHWc) CPU layout carries. An Add of a (1, C, 1, 1) constant
makes ORT leave that layout and come back, two reorders of the whole tensor per block: a ResNet-20 with
half its blocks constant had 13 reorders against the dense model's 1 and ran at 0.68-0.82 of its
MAC-reduction limit (benchmarks/results/aligned_widths_avx2_depth_add.md, the `depth` rows). ORT folds
the normalisation into a conv that writes its input alone (a strided block's projection shortcut), as
it folds any other. Other dtypes and layouts keep the Add.

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
from .channels import LIVE, ZERO
from .ops.base import add_initializer, channel_axis, is_qdq, opset_of


@dataclass(frozen=True)
class DepthResult:
    branches_removed: tuple[str, ...]  # names of the Add nodes bypassed
    nodes_removed: int
    branches_kept: dict[str, str] = field(default_factory=dict)  # Add with a zero operand that stays -> why
    branches_constant: tuple[str, ...] = ()  # names of the Adds whose branch became its constant


# The dtypes a constant operand is written in: floats, whose values the analysis holds in float64 (a bias casts
# back to the same number; a value it computed, such as a norm's shift, to within the dtype's rounding).
_CONSTANT_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and list(a.shape) == list(b.shape)


def remove_zero_branches(model: ir.Model, analysis: Analysis | None = None) -> DepthResult:
    """Bypass the Adds whose one operand is ZERO throughout, in place."""
    analysis = analysis_of(model, analysis)
    states = analysis.states
    removed: list[str] = []
    constant: list[str] = []
    kept: dict[str, str] = {}
    n_before = len(list(model.graph))
    for node in list(model.graph):
        if node.op_type not in ("Add", "Sub") or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        for side in _zero_side_first(node, states):
            z, keep = node.inputs[side], node.inputs[1 - side]
            ch = states.get(z) if z is not None else None
            if ch is None or np.any(ch.state == LIVE):
                continue
            zero = bool(np.all(ch.state == ZERO))
            if not zero and (z.dtype not in _CONSTANT_DTYPES or is_qdq(z.producer()) or channel_axis(z) is None):
                continue  # a quantized branch stays as its runtime computes it; so do other dtypes
            if _requantized(out):
                kept[node.name or out.name] = ("a quantized Add (its sum is requantized): without it the runtime "
                                                "would round the sum differently")
                continue
            if not _same_shape(z, out) or not _same_shape(keep, out):
                kept[node.name or out.name] = "its operands' shapes cannot be shown equal to the sum's"
                continue
            if zero:
                out.replace_all_uses_with(keep)
                model.graph.remove(node, safe=True)
                removed.append(node.name or out.name)
            elif _norm_carries(node, keep):
                shift = -ch.value if node.op_type == "Sub" else ch.value  # x - c is x + (-c), exactly
                _add_as_norm(model.graph, node, keep, shift)
                constant.append(node.name or out.name)
            else:
                node.replace_input_with(side, _channel_constant(model.graph, node, z, ch.value))
                constant.append(node.name or out.name)
            break
    if removed or constant:
        analysis.invalidate()
        # The branch that fed the bypassed Add: every node no output needs any more, and its constants.
        common.RemoveUnusedNodesPass()(model)
    # An Add kept on its own account may have gone with a branch bypassed after it (a GELU's Add inside one).
    done = set(removed) | set(constant)
    left = {node.name or node.outputs[0].name for node in model.graph}
    return DepthResult(tuple(removed), n_before - len(list(model.graph)),
                       {k: v for k, v in kept.items() if k in left and k not in done}, tuple(constant))


def _zero_side_first(node: ir.Node, states) -> tuple[int, ...]:
    """The Add's operand sides, a ZERO operand's first: where one operand is zero and the other constant, dropping
    the zero one deletes its branch whole and keeps the sum as it is, where taking the constant one's side first
    would write a constant and leave the zero branch to be cut down to one channel. A Sub's second side only:
    without its first operand it is the second's negation, no bypass."""
    if node.op_type == "Sub":
        return (1,)
    def zero(side: int) -> bool:
        ch = states.get(node.inputs[side]) if node.inputs[side] is not None else None
        return ch is not None and bool(np.all(ch.state == ZERO))
    return (1, 0) if zero(1) and not zero(0) else (0, 1)


def _channel_constant(graph: ir.Graph, node: ir.Node, value: ir.Value, per_channel: np.ndarray) -> ir.Value:
    """An initializer of the per-channel values, ones on every axis but the channel axis, in the value's dtype:
    it broadcasts to what the value held everywhere."""
    axis, rank = channel_axis(value), len(value.shape)
    shape = [1] * rank
    shape[axis] = len(per_channel)
    array = np.asarray(per_channel, np.float64).astype(value.dtype.numpy()).reshape(shape)
    return add_initializer(graph, f"{node.name or value.name}.constant_branch", array)


def _norm_carries(node: ir.Node, keep: ir.Value) -> bool:
    """Whether keep + constant can be a BatchNormalization: float32, rank 4 with channels on axis 1 (what the
    op normalises along and what ORT's blocked layout holds), at an opset whose BatchNormalization has no
    `spatial` attribute to mind (9 and later)."""
    version = opset_of(node)
    return (keep.dtype == ir.DataType.FLOAT and keep.shape is not None and len(keep.shape) == 4
            and channel_axis(keep) == 1 and version is not None and version >= 9)


def _add_as_norm(graph: ir.Graph, node: ir.Node, keep: ir.Value, per_channel: np.ndarray) -> None:
    """Replace the Add by keep normalised with scale 1, mean 0, variance 1, epsilon 0 and the constant as the
    shift; the sum keeps its value name."""
    base, c = node.name or node.outputs[0].name, len(per_channel)
    shift = add_initializer(graph, f"{base}.constant_branch", np.asarray(per_channel, np.float64).astype(np.float32))
    scale = add_initializer(graph, f"{base}.constant_branch_scale", np.ones(c, np.float32))
    mean = add_initializer(graph, f"{base}.constant_branch_mean", np.zeros(c, np.float32))
    var = add_initializer(graph, f"{base}.constant_branch_var", np.ones(c, np.float32))
    norm = ir.Node("", "BatchNormalization", [keep, scale, shift, mean, var],
                   attributes=[ir.AttrFloat32("epsilon", 0.0)], name=f"{base}.constant_branch")
    ir.convenience.replace_nodes_and_values(graph, node, [node], [norm], [node.outputs[0]], [norm.outputs[0]])


_CLAMPS = ("Relu", "Clip")  # what a runtime folds into the requantization that follows


def _requantized(value: ir.Value) -> bool:
    """A QuantizeLinear reads ``value``, directly or through Relu/Clip."""
    for node, _ in value.uses():
        if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx", "com.microsoft"):
            return True
        if node.op_type in _CLAMPS and node.domain in ("", "ai.onnx") and _requantized(node.outputs[0]):
            return True
    return False
