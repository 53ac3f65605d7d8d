"""RMSNorm (``nn.RMSNorm``, ``F.rms_norm``) through torch's TorchScript exporter.

That exporter writes opsets up to 20 and has no symbolic for ``aten::rms_norm``: ONNX has RMSNormalization
only from opset 23. So a model with an RMSNorm (LLaMA-style pre-norm blocks) failed to export. While our
export runs, ``aten::rms_norm`` is written out as the ops it computes, over the last
``len(normalized_shape)`` axes:

    y = x / sqrt(ReduceMean(x * x) + eps) * weight

as torch computes it (``at::rms_norm``): in float32 for float16 and bfloat16 inputs, the result cast back
before the weight multiplies it, and ``eps`` by default the epsilon of that computing type. The surgery
reads the ReduceMean over the features as the statistic it is (those features stay), and a zero weight as
the zero it writes.

The symbolic is registered for the length of one export and removed after; where the caller registered
their own for ``aten::rms_norm``, theirs is used and left in place.
"""

from __future__ import annotations

import contextlib

import torch

_NAME = "aten::rms_norm"
_REGISTER_OPSET = 9  # a custom symbolic serves every opset from the one it is registered at


def _helpers():
    try:
        from torch.onnx._internal.torchscript_exporter import _type_utils, symbolic_helper
    except ImportError:  # torch before the exporter moved under _internal
        from torch.onnx import _type_utils, symbolic_helper
    return symbolic_helper, _type_utils


def rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """``aten::rms_norm(input, normalized_shape, weight=None, eps=None)`` as Mul, ReduceMean, Add, Sqrt, Div
    and Mul (module docstring)."""
    sh, type_utils = _helpers()
    axes = list(range(-len(sh._get_const(normalized_shape, "is", "normalized_shape")), 0))
    scalar = type_utils.JitScalarType.from_value(x, type_utils.JitScalarType.FLOAT)
    dtype = scalar.dtype()
    upcast = dtype in (torch.float16, torch.bfloat16)
    compute = torch.float32 if upcast else dtype
    eps_value = torch.finfo(compute).eps if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    if upcast:
        x = g.op("Cast", x, to_i=type_utils.JitScalarType.FLOAT.onnx_type())
    if g.opset >= 18:
        mean = g.op("ReduceMean", g.op("Mul", x, x), g.op("Constant", value_t=torch.tensor(axes, dtype=torch.long)),
                    keepdims_i=1)
    else:
        mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
    rms = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value, dtype=compute))))
    y = g.op("Div", x, rms)
    if upcast:
        y = g.op("Cast", y, to_i=scalar.onnx_type())
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def _registered_by_caller(opset: int) -> bool:
    try:
        from torch.onnx._internal.torchscript_exporter.registration import registry
    except ImportError:
        try:
            from torch.onnx._internal.registration import registry
        except ImportError:
            return False
    return registry.is_registered_op(_NAME, opset)


@contextlib.contextmanager
def rms_norm_exportable(opset: int):
    """``aten::rms_norm`` exportable at ``opset`` for the length of the block (module docstring)."""
    if _registered_by_caller(opset):
        yield
        return
    torch.onnx.register_custom_op_symbolic(_NAME, rms_norm_symbolic, _REGISTER_OPSET)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(_NAME, _REGISTER_OPSET)
