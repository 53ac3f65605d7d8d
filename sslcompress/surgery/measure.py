"""MACs, parameters and per-layer shapes of an ONNX model: the numbers in a surgery report.

Read from an onnx_ir model whose shapes are inferred (the surgery's own, after its constants were
folded, so a Pad built from shape arithmetic no longer hides the sizes behind it); a ModelProto is
read the same way after shape inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from .ops.base import attr_value, const_tensor, is_quantized_const


@dataclass(frozen=True)
class OnnxLayer:
    name: str
    op: str
    weight_shape: tuple[int, ...]
    macs: int  # per sample
    group: int = 1  # a Conv's groups: each holds weight_shape[0] / group filters of weight_shape[1] channels
    quantized: bool = False  # the weight is a DequantizeLinear of constants (a QDQ model)


def _dims(v: ir.Value | None) -> list[int]:
    """Static sizes, 1 for each symbolic or unknown one (the batch: MACs are per sample)."""
    if v is None or v.shape is None:
        return []
    return [d if isinstance(d, int) else 1 for d in v.shape]


def _weight_shape(v: ir.Value | None) -> tuple[int, ...] | None:
    if v is None:
        return None
    if v.const_value is not None:
        return tuple(int(d) for d in v.const_value.shape)
    c = const_tensor(v)
    return None if c is None else tuple(c.shape)


def layers_of(model: ir.Model, sizes: dict[str, int] | None = None) -> list[OnnxLayer]:
    """Conv, ConvTranspose, Gemm and MatMul nodes with constant weights, and MatMuls of two activations
    (attention's Q @ K^T and P @ V), in graph order; MACs per sample.

    ``sizes`` gives the symbolic input dims their sizes (those of the inputs verification fed, the batch
    as 1): the model's shapes are then inferred at those sizes, so a dynamic sequence or image size counts
    as what was run, as a static one does, and sizes inference derives from them (``seq*batch``) are
    known too. Without it (or where a size stays unknown) a symbolic dim counts as 1.
    """
    if sizes:
        model = _at_sizes(model, sizes)
    batch = _static_batch(model)
    out = []
    for node in model.graph:
        if (node.op_type, node.domain) in _FUSED_ATTENTION:
            fused = _fused_attention(node, batch)
            if fused is not None:
                out.append(fused)
            continue
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2 \
                or node.domain not in ("", "ai.onnx"):
            continue
        w = _weight_shape(node.inputs[1])
        lhs_weight = node.op_type == "MatMul" and w is None and _weight_shape(node.inputs[0]) is not None
        if lhs_weight:  # a lowered conv: MatMul(weight (M, K), columns (N, K, P))
            w = _weight_shape(node.inputs[0])
        if w is None:
            if node.op_type == "MatMul" and node.inputs[0] is not None and node.inputs[1] is not None:
                out.append(_activation_matmul(node, batch))
            continue
        if node.op_type == "Conv":
            y = _dims(node.outputs[0])
            macs = int(np.prod(w)) * (int(np.prod(y[2:])) if len(y) > 2 else 1)
        elif node.op_type == "ConvTranspose":
            x = _dims(node.inputs[0])
            macs = int(np.prod(w)) * (int(np.prod(x[2:])) if len(x) > 2 else 1)
        elif lhs_weight:
            y = _dims(node.outputs[0])
            macs = int(np.prod(w)) * (y[-1] if y else 1)
        else:
            # Every row of the input (all its axes but the last) meets the weight: (B, S, D) and a
            # transformer's (S, B, D) or (S * B, D) alike count S rows per sample.
            x = _dims(node.inputs[0])
            macs = int(np.prod(w)) * _per_sample(int(np.prod(x[:-1])) if len(x) > 1 else 1, batch)
        group = int(attr_value(node, "group", 1)) if node.op_type in ("Conv", "ConvTranspose") else 1
        quantized = is_quantized_const(node.inputs[0] if lhs_weight else node.inputs[1])
        out.append(OnnxLayer(node.name or node.outputs[0].name, node.op_type, w, macs, group, quantized))
    return out


_FUSED_ATTENTION = {("Attention", ""), ("Attention", "ai.onnx"), ("Attention", "com.microsoft"),
                    ("MultiHeadAttention", "com.microsoft")}


def _fused_attention(node: ir.Node, batch: int) -> OnnxLayer | None:
    """An attention op fused by the exporter or an optimizer: the MACs of the Q @ K^T and P @ V it computes
    (as the two MatMuls it replaces would count), and for com.microsoft Attention its packed input
    projection too. None where the shapes are not known well enough to count."""
    q = _dims(node.inputs[0]) if node.inputs else []
    if node.domain == "com.microsoft" and node.op_type == "Attention":
        w = _weight_shape(node.inputs[1]) if len(node.inputs) > 1 else None
        heads = int(attr_value(node, "num_heads", 0) or 0)
        if w is None or len(w) != 2 or len(q) != 3 or heads <= 0:
            return None
        sizes = attr_value(node, "qkv_hidden_sizes", None)
        dq, _, dv = (int(x) for x in sizes) if sizes is not None and len(sizes) == 3 else (w[1] // 3,) * 3
        past = _dims(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else []
        seq, kv_seq = q[1], q[1] + (past[3] if len(past) == 5 else 0)
        total = q[0] * (seq * w[0] * w[1] + seq * kv_seq * (dq + dv))
        return OnnxLayer(node.name or node.outputs[0].name, node.op_type, w, _per_sample(total, batch))
    k = _dims(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else []
    v = _dims(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else []
    if len(q) == 4 and len(k) == 4 and len(v) == 4:  # (B, heads, S, head size)
        heads, seq, dh, kv_seq, dvh = q[1], q[2], q[3], k[2], v[3]
    elif len(q) == 3 and len(k) == 3 and len(v) == 3:  # (B, S, heads x head size)
        if node.domain == "com.microsoft":
            heads = kv_heads = int(attr_value(node, "num_heads", 0) or 0)
        else:
            heads = int(attr_value(node, "q_num_heads", 0) or 0)
            kv_heads = int(attr_value(node, "kv_num_heads", 0) or 0)
        if heads <= 0 or kv_heads <= 0:
            return None
        seq, dh, kv_seq, dvh = q[1], q[2] // heads, k[1], v[2] // kv_heads
    else:
        return None
    # Cached keys and values from earlier steps (ONNX Attention's past_key) lengthen what each query reads.
    past = _dims(node.inputs[4]) if node.domain != "com.microsoft" and len(node.inputs) > 4 \
        and node.inputs[4] is not None else []
    kv_seq += past[2] if len(past) == 4 else 0
    total = q[0] * heads * seq * kv_seq * (dh + dvh)
    return OnnxLayer(node.name or node.outputs[0].name, node.op_type, (), _per_sample(total, batch))


def _activation_matmul(node: ir.Node, batch: int) -> OnnxLayer:
    """A (..., M, K) @ (..., K, N): K MACs per output element."""
    a, y = _dims(node.inputs[0]), _dims(node.outputs[0])
    k = a[-1] if a else 1
    macs = _per_sample(int(np.prod(y)) * k, batch) if y else 0
    return OnnxLayer(node.name or node.outputs[0].name, node.op_type, (), macs)


def _per_sample(total: int, batch: int) -> int:
    return max(total // batch, 1) if total else 0


def _static_batch(model: ir.Model) -> int:
    """The batch a model with a static batch runs (its first input's first dim), 1 where it is dynamic:
    counts over every row of a value are divided by it."""
    for v in model.graph.inputs:
        if v.shape is not None and len(v.shape) and not v.is_initializer():
            d = v.shape[0]
            return int(d) if isinstance(d, int) and d > 0 else 1
    return 1


def symbol_sizes(model: onnx.ModelProto, feed: dict | None) -> dict[str, int]:
    """Sizes of the model's symbolic input dims as ``feed`` has them, a leading (batch) one as 1."""
    if not feed:
        return {}
    out: dict[str, int] = {}
    for v in model.graph.input:
        arr = feed.get(v.name)
        if arr is None:
            continue
        for i, d in enumerate(v.type.tensor_type.shape.dim):
            if d.HasField("dim_param") and d.dim_param and i < np.ndim(arr):
                out.setdefault(d.dim_param, 1 if i == 0 else int(np.shape(arr)[i]))
    return out


def _at_sizes(model: ir.Model, sizes: dict[str, int]) -> ir.Model:
    """A copy of the model whose inputs have ``sizes`` for their symbolic dims, shapes inferred anew
    (the model itself is left as it is)."""
    from .inputs import set_symbol_sizes

    proto = ir.serde.serialize_model(model)
    if not set_symbol_sizes(proto, sizes):
        return model
    for v in proto.graph.output:
        v.type.tensor_type.ClearField("shape")
    try:
        # data_prop: a Reshape target built from Shape/Gather/Concat of the inputs reads as its sizes.
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return model  # the sizes as the surgery inferred them (unknown ones count as 1)
    from .prepare import rule_shapes_pass

    # Inference stops at ops it does not know (ORT's contrib Attention); the op rules carry shapes through.
    resized = ir.serde.deserialize_model(proto)
    rule_shapes_pass()(resized)
    return resized


def quantized_weights(model: ir.Model) -> int:
    """How many layers read their weight through DequantizeLinear (a QDQ model's quantized weights)."""
    return sum(lay.quantized for lay in layers_of(model))


def parameters_of(model: ir.Model) -> int:
    """Elements of every constant tensor (weights, biases, shape constants)."""
    total = sum(int(np.prod(v.const_value.shape)) for v in model.graph.initializers.values()
                if v.const_value is not None)
    for node in model.graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            c = const_tensor(node.outputs[0])
            total += 0 if c is None else int(c.size)
    return int(total)


def _read(proto: onnx.ModelProto) -> ir.Model:
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        pass  # unknown sizes count as 1
    return ir.serde.deserialize_model(proto)


def layers(proto: onnx.ModelProto) -> list[OnnxLayer]:
    """:func:`layers_of` for a ModelProto, at a batch of 1 where the batch is symbolic (so rows a Reshape
    folds the batch into, tokens times batch, count as the tokens of one sample)."""
    batch = {}
    for v in proto.graph.input:
        dims = v.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param") and dims[0].dim_param:
            batch[dims[0].dim_param] = 1
    return layers_of(_read(proto), batch)


def parameters(proto: onnx.ModelProto) -> int:
    """:func:`parameters_of` for a ModelProto."""
    return parameters_of(ir.serde.deserialize_model(proto))
