"""Small reads and helpers over an ONNX ModelProto shared by the passes outside the surgery's IR: the shapes
shape inference can tell, and fresh value names."""

from __future__ import annotations

import onnx


def value_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Every value's shape that ONNX shape inference can tell (graph inputs and outputs included): ints where
    known, None for symbolic sizes; empty for a model inference cannot read."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - a model inference cannot read is left to the caller's default
        return {}
    g = inferred.graph
    out = {}
    for v in (*g.input, *g.value_info, *g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return out


def fresh_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first not in `taken`, which it joins."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name
