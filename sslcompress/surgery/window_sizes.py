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
padding). Shape inference keeps a name a pass gave (``InferShapesPass``), and carries it on through the
elementwise ops after. Names are only given where the input size is a named symbol and the output's is
unknown or a name inference made up; a known size, or one the exporter named, is never replaced. Pools in
ceil mode, whose last window must start inside the input, keep inference's names.
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


def _spatial_attrs(node: ir.Node, spatial: int) -> tuple[list[int], list[int], list[int], list[int], bool] | None:
    """(kernel, strides, dilations, pads, same) of a windowed op, `same` where automatic padding keeps
    ceil(size / stride); None where its output size is not of that form (ceil mode, a kernel of unknown size)."""
    attrs = node.attributes
    auto_pad = attrs.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER") or attrs.get_int("ceil_mode", 0):
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
    return list(kernel), strides, dilations, pads, auto_pad.startswith("SAME")


def _invented(dim) -> bool:
    """A size nothing has named: unknown, or a name shape inference made up (``unk__N``). An exporter's own
    name (torch.export writes its symbolic expressions) stays: other ops' sizes may be written in it."""
    return isinstance(dim, ir.SymbolicDim) and (dim.value is None or dim.value.startswith("unk__"))


class WindowSizesPass(ir.passes.InPlacePass):
    """Each conv's and pool's symbolic output height and width named after its input's (module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.op_type not in _WINDOWED or node.domain not in ("", "ai.onnx") or not node.inputs:
                continue
            x, y = node.inputs[0], node.outputs[0]
            if x is None or x.shape is None or y.shape is None or len(x.shape) != len(y.shape) or len(x.shape) < 3:
                continue
            spatial = len(x.shape) - 2
            attrs = _spatial_attrs(node, spatial)
            if attrs is None:
                continue
            kernel, strides, dilations, pads, same = attrs
            dims = list(y.shape)
            for i in range(spatial):
                size, out = x.shape[2 + i], dims[2 + i]
                if not _invented(out) or not isinstance(size, ir.SymbolicDim) or size.value is None:
                    continue
                c = 0 if same else pads[i] + pads[i + spatial] - dilations[i] * (kernel[i] - 1)
                name = window_size_name(size.value, c, strides[i])
                if out.value != name:
                    dims[2 + i] = name
            if dims != list(y.shape):
                y.shape = ir.Shape(dims)
                modified = True
        return ir.passes.PassResult(model, modified)
