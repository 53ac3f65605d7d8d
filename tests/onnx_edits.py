"""Edits that turn our own export into what other exporters write, for tests of models users bring."""

from __future__ import annotations

import onnx


def free_height_and_width(proto: onnx.ModelProto, names: tuple[str, str] = ("h", "w")) -> onnx.ModelProto:
    """A copy whose image input leaves its height and width dynamic (dynamic_axes {2: 'h', 3: 'w'})."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    dims = out.graph.input[0].type.tensor_type.shape.dim
    for d, name in zip((dims[2], dims[3]), names, strict=True):
        d.Clear()
        d.dim_param = name
    del out.graph.value_info[:]
    return out
