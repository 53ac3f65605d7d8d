"""Constants as the rules and passes read and write them: initializers, Constant nodes, and
quantized constants (a DequantizeLinear of constants, a QDQ model's weight).

Readers give the values as ONNX Runtime computes them; writers change a constant without touching
what else reads it (a shared initializer is copied), and a quantized constant is changed in its
quantized tensor, its scale and zero point with it, wherever the change allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


def input_or_none(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def attr_value(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


_COPIES = "sslcompress.copies"  # meta of a shared constant: the copies set_const made of it for its readers


def set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Replace a constant input; an initializer shared with other nodes is copied, not changed. Readers of one
    shared constant that are given equal values share one copy: a detector's head, one conv applied to every
    pyramid level, keeps one weight when every level loses the same channels."""
    old = node.inputs[index]
    dtype = const_tensor(old).dtype
    array = np.ascontiguousarray(np.asarray(array).astype(dtype))
    twin = _equal_copy(graph, old, array)
    if old.is_initializer() and len(old.uses()) == 1 and not old.is_graph_output():
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        if twin is not None:  # the other readers' equal copy goes: all read the constant by its own name
            twin.replace_all_uses_with(old)
            del graph.initializers[twin.name]
        return
    if twin is None:
        twin = add_initializer(graph, f"{old.name}.{node.name or node.op_type}.{index}", array)
        old.meta.setdefault(_COPIES, []).append(twin)
    node.replace_input_with(index, twin)
    if old.const_value is None:  # a dequantized constant, now written as its float values
        _drop_unread_qdq(graph, old)


def _equal_copy(graph: ir.Graph, old: ir.Value, array: np.ndarray) -> ir.Value | None:
    """A copy set_const made of `old` for another reader that still holds exactly `array` (it may have been
    changed in place since, or dropped)."""
    for copy in old.meta.get(_COPIES, ()):
        if graph.initializers.get(copy.name) is not copy or copy.const_value is None:
            continue
        have = copy.const_value.numpy()
        if have.dtype == array.dtype and have.shape == array.shape and np.array_equal(have, array):
            return copy
    return None


def drop_unused_constants(graph: ir.Graph) -> None:
    """Initializers and Constant nodes a rewrite left without readers."""
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]
    for node in list(graph):
        if node.op_type == "Constant" and all(not v.uses() and not v.is_graph_output() for v in node.outputs):
            graph.remove(node, safe=True)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    name = unique_name(graph, name)
    array = np.ascontiguousarray(array)
    value = ir.Value(name=name, shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def unique_name(graph: ir.Graph, name: str) -> str:
    taken = set(graph.initializers)
    if name not in taken:
        return name
    i = 1
    while f"{name}.{i}" in taken:
        i += 1
    return f"{name}.{i}"


# ---- Readers shared by the rules and the passes.

def const_tensor(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents in their own dtype: an initializer or a Constant node's output,
    or a DequantizeLinear (QuantizeLinear) of constants, as ONNX Runtime computes it (a quantized
    weight reads as its float values; see :func:`take_const` to change it)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if is_qdq(node):
        return _qdq_constant(value, node)
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for name, attr in node.attributes.items():
        if name == "value":
            return attr.value.numpy()
        if name in ("value_float", "value_int"):
            return np.asarray(attr.value, np.float32 if name == "value_float" else np.int64)
        if name in ("value_floats", "value_ints"):
            return np.asarray(list(attr.value), np.float32 if name == "value_floats" else np.int64)
    return None


def const_array(value: ir.Value | None) -> np.ndarray | None:
    c = const_tensor(value)
    return None if c is None else np.asarray(c, dtype=np.float64)


# ---- Quantized constants (QDQ models): a DequantizeLinear of constants is a constant. Its readers
# see the float values; take_const picks entries of the quantized tensor itself, with a per-channel
# scale and zero point following, so a weight stays quantized and runtimes that fuse QDQ still do.

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
# Quantized types whose entries can be picked one by one (int4 packs two per byte, float8 and blocked
# scales are left to a rule that knows them): the surgery slices these and declines the others.
SLICEABLE_QUANT = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32)
_INT_RANGE = {ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255), ir.DataType.INT16: (-32768, 32767),
              ir.DataType.UINT16: (0, 65535)}
_CACHE = "sslcompress.qdq_constant"  # ir.Value.meta: (inputs and their tensors, the array computed)


def is_qdq(node: ir.Node | None) -> bool:
    """A QuantizeLinear or DequantizeLinear (ONNX or com.microsoft)."""
    return node is not None and node.op_type in QDQ_OPS and node.domain in QDQ_DOMAINS


@dataclass(frozen=True)
class Quantization:
    """The parameters of one QuantizeLinear/DequantizeLinear: scale and zero point (None: 0), the axis
    they run along (None: one for the whole tensor), the block size (0: none) and the quantized type."""

    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None
    block_size: int
    qtype: ir.DataType

    def expand(self, param: np.ndarray | None, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """A scale or zero point broadcast to a tensor of ``shape`` (zeros for a missing zero point)."""
        if param is None:
            return np.zeros(shape, dtype)
        param = np.asarray(param)
        if self.axis is None:
            return np.broadcast_to(param.reshape(()).astype(dtype), shape)
        if self.block_size:
            full = np.repeat(param, self.block_size, axis=self.axis)
            full = np.take(full, np.arange(shape[self.axis]), axis=self.axis)
            return np.broadcast_to(full.astype(dtype), shape)
        lead = [-1 if i == self.axis else 1 for i in range(len(shape))]
        return np.broadcast_to(param.reshape(lead).astype(dtype), shape)


def quantization(node: ir.Node, rank: int | None) -> Quantization | None:
    """What a QuantizeLinear/DequantizeLinear does to a tensor of ``rank``; None when its scale or zero
    point is computed at run time, or its axis cannot be placed."""
    scale = const_tensor(input_or_none(node, 1))
    zp_value = input_or_none(node, 2)
    zp = const_tensor(zp_value) if zp_value is not None else None
    if scale is None or (zp_value is not None and zp is None):
        return None
    block = int(attr_value(node, "block_size", 0) or 0)
    axis = None
    if scale.size != 1 or block:
        if rank is None:
            return None
        axis = int(attr_value(node, "axis", 1))
        axis = axis + rank if axis < 0 else axis
        if not 0 <= axis < rank:
            return None
    return Quantization(np.asarray(scale), None if zp is None else np.asarray(zp), axis, block, _qtype(node, zp))


def _qtype(node: ir.Node, zp: np.ndarray | None) -> ir.DataType:
    """The quantized side's type: the zero point's (the spec ties them), else the tensor's, else the
    default of QuantizeLinear (``output_dtype``, or uint8)."""
    if zp is not None:
        return ir.DataType.from_numpy(zp.dtype)
    quantized = node.inputs[0] if node.op_type == "DequantizeLinear" else node.outputs[0]
    if quantized is not None and quantized.type is not None and quantized.type.dtype is not None:
        return quantized.type.dtype
    if node.op_type == "DequantizeLinear":
        x = const_tensor(node.inputs[0])
        return ir.DataType.from_numpy(x.dtype) if x is not None else ir.DataType.UNDEFINED
    return ir.DataType(int(attr_value(node, "output_dtype", 0) or ir.DataType.UINT8))


def dequantize(q: np.ndarray, p: Quantization, dtype=np.float32) -> np.ndarray:
    """(q - zero point) * scale, the difference taken exactly, the product in float32 (as ORT does)."""
    if np.asarray(q).dtype.kind in "iu" or p.qtype in _INT_RANGE or p.qtype == ir.DataType.INT32:
        diff = np.asarray(q).astype(np.int64) - p.expand(p.zero_point, q.shape, np.int64)
    else:  # float8 and other float types, read through ml_dtypes
        diff = np.asarray(q).astype(np.float32) - p.expand(p.zero_point, q.shape, np.float32)
    out = diff.astype(np.float32) * p.expand(p.scale, q.shape, np.float32)
    return out.astype(p.scale.dtype if p.scale.dtype.kind == "f" else dtype, copy=False)


def quantize(x: np.ndarray, p: Quantization) -> np.ndarray | None:
    """saturate(round(x / scale) + zero point), rounding half to even (as ORT does); None for a type
    other than (u)int8/(u)int16."""
    if p.qtype not in _INT_RANGE:
        return None
    lo, hi = _INT_RANGE[p.qtype]
    x = np.asarray(x, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.rint(x / p.expand(p.scale, x.shape)) + p.expand(p.zero_point, x.shape)
    return np.clip(y, lo, hi).astype(ir.DataType(p.qtype).numpy())


def _qdq_constant(value: ir.Value, node: ir.Node) -> np.ndarray | None:
    leaves = tuple((v, None if v is None else v.const_value) for v in node.inputs)
    cached = value.meta.get(_CACHE)
    if cached is not None and len(cached[0]) == len(leaves) and all(
            a is c and b is d for (a, b), (c, d) in zip(cached[0], leaves, strict=True)):
        return cached[1]
    x = const_tensor(input_or_none(node, 0))
    p = quantization(node, None if x is None else x.ndim) if x is not None else None
    if p is None:
        return None
    try:
        out = dequantize(x, p) if node.op_type == "DequantizeLinear" else quantize(x, p)
    except (TypeError, ValueError):  # a type numpy cannot read: leave it unread
        return None
    if out is None:
        return None
    out = np.ascontiguousarray(out)
    out.setflags(write=False)
    if all(v is None or c is not None for v, c in leaves):  # constants that cannot change under us
        value.meta[_CACHE] = (leaves, out)
    return out


def is_quantized_const(value: ir.Value | None) -> bool:
    """A constant made by QuantizeLinear/DequantizeLinear of constants (a quantized weight or bias)."""
    return value is not None and value.const_value is None and is_qdq(value.producer()) \
        and const_tensor(value) is not None


def quant_blocker(value: ir.Value | None) -> str | None:
    """Why a constant made by DequantizeLinear (or QuantizeLinear) cannot lose entries and stay
    quantized as it is; None for a plain constant, a value that is not constant, or one that can."""
    node = value.producer() if value is not None and value.const_value is None else None
    if not is_qdq(node) or const_tensor(value) is None:
        return None
    x = const_tensor(node.inputs[0])
    p = quantization(node, x.ndim)
    name = p.qtype.name if isinstance(p.qtype, ir.DataType) else str(p.qtype)
    if p.qtype not in SLICEABLE_QUANT:
        return f"quantized to {name}, which the surgery does not slice"
    if p.block_size:
        return f"block-quantized (block_size {p.block_size}), which the surgery does not slice"
    if p.axis is not None and p.scale.ndim != 1:
        return f"quantized with a scale of shape {list(p.scale.shape)}, which the surgery does not slice"
    return quant_blocker(node.inputs[0])


def take_const(graph: ir.Graph, node: ir.Node, index: int, select: Callable[[np.ndarray], np.ndarray]) -> None:
    """Replace constant input ``index`` by ``select`` of it, where ``select`` only picks entries
    (slices, index arrays, masks, concatenations of such, the rank kept). Behind a DequantizeLinear the
    quantized tensor is picked the same way and a per-channel scale and zero point follow, so the
    weight stays quantized (a DequantizeLinear other nodes read too is copied first). Anything else is
    written by :func:`set_const`, as the float values it holds."""
    if not _take_quantized(graph, node, index, select):
        set_const(graph, node, index, select(const_tensor(node.inputs[index])))


def _take_quantized(graph: ir.Graph, reader: ir.Node, index: int, select) -> bool:
    value = reader.inputs[index]
    node = value.producer() if value.const_value is None else None
    if not is_qdq(node) or quant_blocker(value) is not None:
        return False
    x = const_tensor(node.inputs[0])
    p = quantization(node, None if x is None else x.ndim)
    if x is None or p is None:
        return False
    shape = np.asarray(select(np.broadcast_to(np.zeros((), np.int8), x.shape))).shape
    params: dict[int, np.ndarray] = {}
    if p.axis is not None:
        for i, param in ((1, p.scale), (2, p.zero_point)):
            if param is None:
                continue
            line = _follow(select, p.expand(param, x.shape, param.dtype), p.axis)
            if line is None or len(shape) != x.ndim:
                return False  # the pick mixes the quantization axis with others
            params[i] = line
    if len(value.uses()) != 1 or value.is_graph_output():
        node = _own_copy(graph, node, reader, index)
    if not _take_quantized(graph, node, 0, select):
        set_const(graph, node, 0, select(x))
    for i, line in params.items():
        set_const(graph, node, i, line)
    node.outputs[0].shape = ir.Shape(shape)
    node.outputs[0].meta.pop(_CACHE, None)
    return True


def _follow(select, full: np.ndarray, axis: int) -> np.ndarray | None:
    """A per-channel parameter (broadcast to the whole tensor) after ``select``: one entry per kept
    position of ``axis``, or None when the picked entries do not line up along that axis."""
    picked = np.asarray(select(full))
    if picked.ndim != full.ndim or picked.size == 0:
        return None
    line = picked[tuple(slice(None) if i == axis else 0 for i in range(picked.ndim))]
    lead = [-1 if i == axis else 1 for i in range(picked.ndim)]
    if not np.array_equal(np.broadcast_to(line.reshape(lead), picked.shape), picked):
        return None
    return np.ascontiguousarray(line)


def _own_copy(graph: ir.Graph, node: ir.Node, reader: ir.Node, index: int) -> ir.Node:
    """A copy of ``node`` (reading the same inputs) that only ``reader`` reads, at input ``index``."""
    out = node.outputs[0]
    taken = {v.name for n in graph for v in n.outputs} | set(graph.initializers)
    name, i = f"{out.name}.{reader.name or reader.op_type}", 1
    while name in taken:
        name, i = f"{out.name}.{reader.name or reader.op_type}.{i}", i + 1
    copy = ir.Node(node.domain, node.op_type, list(node.inputs),
                   [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                   num_outputs=1, version=node.version, name=f"{node.name or node.op_type}.{name}")
    copy.outputs[0].name = name
    copy.outputs[0].type = out.type
    copy.outputs[0].shape = out.shape
    graph.insert_before(reader, copy)
    reader.replace_input_with(index, copy.outputs[0])
    return copy


def _drop_unread_qdq(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the QuantizeLinear/DequantizeLinear chain that made ``value`` once nothing reads it."""
    node = value.producer()
    while is_qdq(node) and node.graph is graph and not any(v.uses() or v.is_graph_output() for v in node.outputs):
        source = node.inputs[0]
        graph.remove(node, safe=True)
        node = source.producer() if source is not None else None
