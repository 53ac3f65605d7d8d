"""What every op rule shares: channel states, the rule interface, the registry, small readers.

A rule tells, for one ONNX op type, how channels (positions along axis 1) flow through it:

- ``forward``: the state of each output channel (ZERO / CONSTANT(value) / LIVE) from the
  states of the inputs and the constant parameters;
- ``couple``: which output channels are the same channels as which input channels (they can
  only be deleted together); None makes the node a wall, whose channels are never deleted;
- ``backward``: which input channels the node needs in order to compute the output channels
  that are needed downstream;
- ``rewrite``: change the node's parameters and attributes once channels are deleted.

An op without a rule is a wall; an unknown op is never taken for an elementwise one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

ZERO, CONSTANT, LIVE = 0, 1, 2

Ids = list[int]
Mask = np.ndarray  # bool, one per channel


@dataclass
class Channels:
    """Per-channel knowledge of one tensor: state (ZERO/CONSTANT/LIVE) and value where known."""

    state: np.ndarray  # int8, one per channel
    value: np.ndarray  # float64; 0 for ZERO, the constant for CONSTANT, nan for LIVE

    @classmethod
    def live(cls, n: int) -> Channels:
        return cls(np.full(n, LIVE, np.int8), np.full(n, np.nan))

    @classmethod
    def known(cls, values: np.ndarray) -> Channels:
        values = np.asarray(values, np.float64)
        state = np.where(values == 0, ZERO, CONSTANT).astype(np.int8)
        return cls(state, np.where(values == 0, 0.0, values))

    def __len__(self) -> int:
        return len(self.state)

    @property
    def is_known(self) -> np.ndarray:
        return self.state != LIVE

    @property
    def known_values(self) -> np.ndarray:
        """Values with LIVE channels read as 0, for arithmetic whose LIVE results are masked."""
        return np.where(self.is_known, np.nan_to_num(self.value), 0.0)

    def with_live(self, live: np.ndarray) -> Channels:
        state = np.where(live, LIVE, self.state).astype(np.int8)
        return Channels(state, np.where(live, np.nan, self.value))

    def take(self, index) -> Channels:
        return Channels(self.state[index], self.value[index])


class Context:
    """Channel ids the coupling hands a rule: fresh ones for new channels."""

    def fresh(self, n: int) -> Ids:  # pragma: no cover - implemented by the coupling
        raise NotImplementedError

    def union(self, a: int, b: int) -> None:  # pragma: no cover
        raise NotImplementedError


class OpRule:
    """The default rule is a wall: outputs LIVE, no coupling, every input channel needed.

    ``in_axes`` says on which axis the rule reads each input's channels (None: whatever axis the
    value has, or none at all); an input whose channels run on another axis is shown to the rule
    as unknown, and the coupling pins its channels. ``out_axes`` says where each output carries
    its channels (the layout analysis stores it on the value).
    """

    # True where the first output always has the first input's shape (elementwise unary ops): the
    # layout analysis then fills in an output shape that shape inference could not give (custom ops).
    same_shape = False

    def fill_shapes(self, node: ir.Node) -> None:
        """Give outputs the shapes this rule knows where shape inference left them unknown (custom ops,
        targets built at run time): the layout analysis calls it before reading channel counts."""
        if self.same_shape and node.inputs and node.inputs[0] is not None:
            src, dst = node.inputs[0], node.outputs[0]
            refine_shape(dst, None if src.shape is None else list(src.shape))
            if dst.type is None and src.type is not None:
                dst.type = src.type

    def in_axes(self, node: ir.Node) -> list[int | None]:
        return [None] * len(node.inputs)

    def out_axes(self, node: ir.Node) -> list[int | None]:
        return [1] * len(node.outputs)

    def forward(self, node: ir.Node, ins: list[Channels | None]) -> list[Channels | None]:
        return [None] * len(node.outputs)

    def couple(self, node: ir.Node, ids: list[Ids | None], ctx: Context) -> list[Ids | None] | Decline | None:
        """Output ids; a Decline (or None) makes the node a wall."""
        return None

    def backward(self, node: ir.Node, needed: list[Mask | None],
                 ins: list[Channels | None]) -> list[Mask | None]:
        return [None] * len(node.inputs)

    def rewrite(self, graph: ir.Graph, node: ir.Node, keep_in: list[Mask | None],
                keep_out: list[Mask | None]) -> bool:
        """Adjust parameters to the kept channels; True when the node changed."""
        return False

    def settle(self, node: ir.Node, keep_in: list[Mask | None], keep_out: list[Mask | None]) -> Keep | None:
        """Channels the rewrite needs kept beyond the dead set's keep masks (a grouped Conv keeps its
        groups equal), or None when it can write these masks as they are. The prune pass asks again
        until no rule wants more: a channel kept here is kept wherever it flows."""
        return None


@dataclass(frozen=True)
class Keep:
    """A rule's answer to ``settle``: per input and per output, the channels to keep as well, and why."""

    inputs: list[Mask | None]
    outputs: list[Mask | None]
    reason: str


def follow_axis(src: ir.Value | None, dst: ir.Value | None) -> int | None:
    """The channel axis of ``src`` as seen on ``dst`` of another rank (aligned from the right,
    as broadcasting aligns them)."""
    a = channel_axis(src)
    if a is None or dst is None or dst.shape is None or src.shape is None:
        return a
    a = len(dst.shape) - len(src.shape) + a
    return a if 0 < a < len(dst.shape) else None


class PassThrough(OpRule):
    """Output channel c is input channel c (first input); any other inputs are constants."""

    def out_axes(self, node):
        return [follow_axis(node.inputs[0] if node.inputs else None, node.outputs[0])] + \
            [1] * (len(node.outputs) - 1)

    def couple(self, node, ids, ctx):
        x = ids[0] if ids else None
        n = channel_count(node.outputs[0])
        if x is None or n != len(x):
            return None
        return [list(x)] + [None] * (len(node.outputs) - 1)

    def backward(self, node, needed, ins):
        return [needed[0]] + [None] * (len(node.inputs) - 1)


@dataclass(frozen=True)
class Decline:
    """A rule's answer when it cannot read a node: the node is a wall, and this is why."""

    reason: str


@dataclass(frozen=True)
class _Entry:
    rule: OpRule
    first: int  # the first opset version the rule reads
    last: int | None  # the last, None for every later one


_RULES: dict[tuple[str, str], list[_Entry]] = {}

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _domain(domain: str) -> str:
    return "" if domain in _DEFAULT_DOMAINS else domain


def register_rule(op_type: str, rule: OpRule, *, domain: str = "", opsets: tuple[int, int | None] = (1, None)) -> None:
    """The public extension point: ``rule`` reads ``op_type`` of ``domain`` at the opset versions
    ``opsets`` (first, last; None for no last). A later registration for an overlapping range wins,
    so a user's rule can replace a built-in one."""
    first, last = opsets
    if last is not None and last < first:
        raise ValueError(f"opset range {opsets} is empty")
    _RULES.setdefault((_domain(domain), op_type), []).insert(0, _Entry(rule, int(first), last))


def register(*op_types: str, domain: str = "", opsets: tuple[int, int | None] = (1, None)):
    """Class decorator: one instance of the rule serves every op type named."""
    def wrap(cls: type[OpRule]) -> type[OpRule]:
        rule = cls()
        for op in op_types:
            register_rule(op, rule, domain=domain, opsets=opsets)
        return cls
    return wrap


def label(node: ir.Node) -> str:
    """How the report names a node: its op type and its name, or its first output's."""
    return f"{node.op_type} {node.name or (node.outputs[0].name if node.outputs else '')}"


def opset_of(node: ir.Node) -> int | None:
    """The opset version the node's domain is imported at; None where its graph does not say
    (a subgraph's imports live on the model)."""
    if node.version is not None:
        return int(node.version)
    if node.graph is None:
        return None
    imports = node.graph.opset_imports
    domain = _domain(node.domain)
    for key in ((domain,) if domain else _DEFAULT_DOMAINS):
        if key in imports:
            return int(imports[key])
    return None


def rule_for(node: ir.Node) -> OpRule | None:
    entries = _RULES.get((_domain(node.domain), node.op_type))
    if not entries:
        return None
    version = opset_of(node)
    for e in entries:
        if version is None or (e.first <= version and (e.last is None or version <= e.last)):
            return e.rule
    return None


def handled_ops() -> tuple[str, ...]:
    """Op types with a rule in the default domain (at some opset)."""
    return tuple(sorted(op for (domain, op) in _RULES if domain == ""))


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


def input_or_none(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


AXIS_KEY = "sslcompress.channel_axis"  # ir.Value.meta entry: the axis that carries channels


def refine_shape(value: ir.Value, dims: list | None) -> None:
    """Set what is known of a value's shape: a known size or a named symbol replaces an unknown or
    freshly invented symbol (shape inference names each unknown size anew, ``unk__N``), never a
    known size."""
    if dims is None:
        return
    old = value.shape
    if old is None or len(old) != len(dims):
        value.shape = ir.Shape(dims)
        return
    merged = [o if isinstance(o, int) or d is None else d for o, d in zip(old, dims, strict=True)]
    if merged != list(old):
        value.shape = ir.Shape(merged)


def channel_axis(value: ir.Value | None) -> int | None:
    """The axis of the value that carries channels: what its producer's rule said (layout
    analysis), axis 1 where nothing said otherwise; None for a value of rank < 2 or no shape."""
    if value is None or value.shape is None or len(value.shape) < 2:
        return None
    axis = value.meta.get(AXIS_KEY)
    if axis is None:
        return 1
    return axis if 0 < axis < len(value.shape) else None


def channel_count(value: ir.Value | None) -> int | None:
    axis = channel_axis(value)
    if axis is None:
        return None
    d = value.shape[axis]
    return int(d) if isinstance(d, int) else None


def rank_of(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def static_dims(value: ir.Value | None, start: int = 0) -> list[int] | None:
    """The dims from ``start`` on when all are known integers, else None."""
    if value is None or value.shape is None:
        return None
    dims = list(value.shape)[start:]
    return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else None


def attr_value(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Replace a constant input; an initializer shared with other nodes is copied, not changed."""
    old = node.inputs[index]
    dtype = const_tensor(old).dtype
    array = np.ascontiguousarray(np.asarray(array).astype(dtype))
    if old.is_initializer() and len(old.uses()) == 1 and not old.is_graph_output():
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        return
    value = add_initializer(graph, f"{old.name}.{node.name or node.op_type}.{index}", array)
    node.replace_input_with(index, value)
    if old.const_value is None:  # a dequantized constant, now written as its float values
        _drop_unread_qdq(graph, old)


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


def channel_constant(value: ir.Value, n: int, out_rank: int, axis: int = 1) -> tuple[Channels, int] | None:
    """A constant operand seen per channel of an output with ``n`` channels on ``axis``.

    Returns the channel states (a channel whose slice holds one value is known, one whose values
    vary over space is LIVE) and the constant's own axis that runs along the channels (-1 when
    it broadcasts over them); None when it does not broadcast onto the output.
    """
    c = const_array(value)
    if c is None or c.ndim > out_rank or not 0 <= axis < out_rank:
        return None
    shape = (1,) * (out_rank - c.ndim) + c.shape
    if shape[axis] not in (1, n):
        return None
    full = c.reshape(shape)
    own = axis - (out_rank - c.ndim)
    own_axis = own if shape[axis] == n and n > 1 and own >= 0 else -1
    per = np.moveaxis(full, axis, 0).reshape(shape[axis], -1)
    uniform = np.all(per == per[:, :1], axis=1)
    vals = np.where(uniform, per[:, 0], 0.0)
    if shape[axis] == 1:
        vals, uniform = np.full(n, vals[0]), np.full(n, uniform[0])
    return Channels.known(vals).with_live(~uniform), own_axis


Handler = Callable[[ir.Node, list[Channels | None]], list[Channels | None]]
