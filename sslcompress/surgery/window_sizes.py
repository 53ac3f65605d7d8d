"""Names for the sizes that convs and pools compute from a symbolic height or width.

Shape inference names every size it cannot compute anew (``unk__N``), so two convs that read the same
dynamic height and shrink it the same way get two names, and nothing can show their outputs the same size:
at a dynamic height and width a strided residual block's branch (3x3, stride 2, padding 1) and its
projection shortcut (1x1, stride 2) look unequal, and the branch cannot be bypassed when it is zero.

A conv or pool with explicit pads and ``ceil_mode`` 0 computes
``floor((in + pads - dilation * (kernel - 1) - 1) / stride) + 1`` from each spatial input size, which for whole
numbers is ``ceil((in + c) / stride)`` with ``c = pads - dilation * (kernel - 1)``; with ``auto_pad`` SAME_UPPER
or SAME_LOWER it computes ``ceil(in / stride)``, c = 0 (and VALID is pads 0). This pass names the output size
by that form over the input's name, so equal computations from one symbol get one name however they are
written: ``ceil(height/2)`` for a 3x3 conv of stride 2 and padding 1, for the 1x1 projection of stride 2 beside
it and for a SAME-padded conv of stride 2, and the input's own name where the size stays (stride 1, "same"
padding). Shape inference keeps a name a value already has, even one it made up in an earlier round, so the
pass carries the names on itself, in graph order, through the elementwise ops after (a BatchNormalization a
foreign export kept, a ReLU, the Add that joins a branch and its shortcut): an output size takes the name its
inputs share at that axis. Names are only given where the output's size is unknown or a name inference made
up, and only from real names the inputs already hold (never from one inference made up, which it may make up
again for another size once the first is gone), so no two sizes can come to share a name they do not share in
fact; a known size, or one the exporter named, is never replaced.

A pool in ceil mode computes ``ceil((in + pads - dilation * (kernel - 1) - 1) / stride) + 1``, that is
``ceil((in + c + stride - 1) / stride)``, less one where its last window would start in the end padding. That
window starts at ``(out - 1) * stride``, below ``in + pads - dilation * (kernel - 1) - 1 + stride``; so where the
end padding plus the stride is at most ``dilation * (kernel - 1) + 1`` it always starts inside the input (or the
begin padding) and the form holds at every size: the 2x2 average pool of stride 2 in a ResNet-D shortcut names
its output ``ceil(height/2)`` like the strided conv beside it. Other ceil-mode pools, whose size depends on that
check, keep inference's names.
"""

from __future__ import annotations

import onnx_ir as ir

_WINDOWED = ("Conv", "MaxPool", "AveragePool", "LpPool")


def window_size_name(size: str, c: int, stride: int) -> str:
    """The name of ceil((size + c) / stride): the size itself where that is the identity."""
    shifted = size if c == 0 else f"{size}{c:+d}"
    if stride == 1:
        return shifted
    return f"ceil({shifted}/{stride})" if c == 0 else f"ceil(({shifted})/{stride})"


def _spatial_attrs(node: ir.Node, spatial: int) -> tuple[list[int], list[int], list[int], list[int], bool, bool] | None:
    """(kernel, strides, dilations, pads, same, ceil) of a windowed op, `same` where automatic padding keeps
    ceil(size / stride), `ceil` for a pool in ceil mode; None where the kernel's size is unknown."""
    attrs = node.attributes
    auto_pad = attrs.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return None
    kernel = attrs.get_ints("kernel_shape", None)
    if kernel is None and node.op_type == "Conv" and len(node.inputs) > 1 and node.inputs[1] is not None:
        w = node.inputs[1].shape
        kernel = list(w[2:]) if w is not None and len(w) == spatial + 2 else None
    if kernel is None or len(kernel) != spatial or not all(isinstance(k, int) for k in kernel):
        return None
    strides = list(attrs.get_ints("strides", [1] * spatial))
    dilations = list(attrs.get_ints("dilations", [1] * spatial))
    explicit = auto_pad == "NOTSET"
    pads = list(attrs.get_ints("pads", [0] * (2 * spatial))) if explicit else [0] * (2 * spatial)
    if len(strides) != spatial or len(dilations) != spatial or len(pads) != 2 * spatial:
        return None
    return list(kernel), strides, dilations, pads, auto_pad.startswith("SAME"), bool(attrs.get_int("ceil_mode", 0))


# Ops whose output has their first input's shape (the others are parameters along the channels, or scalars),
# and ops whose output has their inputs' shapes broadcast together: a size of the output is the size those
# inputs share there, so a name carries through them from a windowed op to the Add that joins two.
_SHAPE_OF_FIRST = frozenset({
    "Abs", "BatchNormalization", "Cast", "Clip", "Dropout", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish",
    "Identity", "InstanceNormalization", "LeakyRelu", "Mish", "Neg", "Relu", "Selu", "Sigmoid", "Softplus", "Sqrt",
    "Tanh",
})
_BROADCAST = frozenset({"Add", "Div", "Max", "Min", "Mul", "PRelu", "Sub", "Sum"})


def _windowed_dims(node: ir.Node, x: ir.Value, y: ir.Value) -> list | None:
    """The output dims of a conv or pool with its spatial sizes named (module docstring)."""
    if x.shape is None or y.shape is None or len(x.shape) != len(y.shape) or len(x.shape) < 3:
        return None
    spatial = len(x.shape) - 2
    attrs = _spatial_attrs(node, spatial)
    if attrs is None:
        return None
    kernel, strides, dilations, pads, same, ceil = attrs
    dims = list(y.shape)
    for i in range(spatial):
        size = x.shape[2 + i]
        # Only from a real name: one inference made up may be made up again for another size once it is gone.
        if not invented(dims[2 + i]) or not isinstance(size, ir.SymbolicDim) or invented(size):
            continue
        reach = dilations[i] * (kernel[i] - 1)
        if same:
            c = 0
        elif not ceil:
            c = pads[i] + pads[i + spatial] - reach
        elif pads[i + spatial] + strides[i] <= reach + 1:  # the last window never starts in the end padding
            c = pads[i] + pads[i + spatial] - reach + strides[i] - 1
        else:
            continue
        dims[2 + i] = window_size_name(size.value, c, strides[i])
    return dims


def _broadcast_dims(inputs: list[ir.Value | None], y: ir.Value) -> list | None:
    """The output dims of an elementwise op with each invented size replaced by the name its inputs share at
    that axis (inputs aligned from the last axis; a missing axis or a size of 1 broadcasts)."""
    if y.shape is None:
        return None
    shapes = [v.shape for v in inputs if v is not None]
    if not shapes or any(s is None for s in shapes):
        return None
    dims = list(y.shape)
    for i in range(len(dims)):
        if not invented(dims[i]):
            continue
        back = len(dims) - i
        names = {s[len(s) - back] for s in shapes if len(s) >= back and s[len(s) - back] != 1}
        if len(names) == 1:
            (only,) = names
            if isinstance(only, ir.SymbolicDim) and only.value is not None and not invented(only):
                dims[i] = only.value
    return dims


def invented(dim) -> bool:
    """A size nothing has named: unknown, or a name shape inference made up (``unk__N``)."""
    return isinstance(dim, ir.SymbolicDim) and (dim.value is None or dim.value.startswith("unk__"))


class WindowSizesPass(ir.passes.InPlacePass):
    """Each conv's and pool's symbolic output height and width named after its input's, and the names carried
    on through elementwise ops (module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:  # in order: a name given reaches the ops after it in the same walk
            if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
                continue
            y = node.outputs[0]
            if node.op_type in _WINDOWED:
                dims = _windowed_dims(node, node.inputs[0], y)
            elif node.op_type in _SHAPE_OF_FIRST:
                dims = _broadcast_dims(node.inputs[:1], y)
            elif node.op_type in _BROADCAST:
                dims = _broadcast_dims(list(node.inputs), y)
            else:
                continue
            if dims is not None and dims != list(y.shape):
                y.shape = ir.Shape(dims)
                modified = True
        return ir.passes.PassResult(model, modified)
