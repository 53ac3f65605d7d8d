"""What every op rule shares: channel states, the rule interface, the registry, the channel axis.

A rule tells, for one ONNX op type, how channels (positions along each value's channel axis) flow
through it:

- ``forward``: the state of each output channel (ZERO / CONSTANT(value) / LIVE) from the
  states of the inputs and the constant parameters;
- ``couple``: which output channels are the same channels as which input channels (they can
  only be deleted together); ``Decline(reason)`` (or None) makes the node a wall, whose channels
  are never deleted, and the reason goes into the report;
- ``backward``: which input channels the node needs in order to compute the output channels
  that are needed downstream;
- ``rewrite``: change the node's parameters and attributes once channels are deleted;
- ``in_axes`` / ``out_axes``: where the rule reads and writes channels; ``fill_shapes``: output
  shapes it can prove where inference could not; ``settle``: channels it must keep for the rest
  to stay valid (a grouped conv's equal groups).

An op without a rule is a wall; an unknown op is never taken for an elementwise one. Rules are
registered per (domain, op type, opset range); ``register_rule`` is the public way in. Reading and
writing constants lives in constants.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .constants import (  # noqa: F401  (the rules import them from here)
    QDQ_DOMAINS,
    QDQ_OPS,
    SLICEABLE_QUANT,
    Quantization,
    add_initializer,
    attr_value,
    const_array,
    const_tensor,
    dequantize,
    drop_unused_constants,
    input_or_none,
    is_qdq,
    is_quantized_const,
    quant_blocker,
    quantization,
    quantize,
    set_const,
    take_const,
    unique_name,
)

ZERO, CONSTANT, LIVE = 0, 1, 2

Ids = list[int]
Mask = np.ndarray  # bool, one per channel


@dataclass
class Channels:
    """Per-channel knowledge of one tensor: state (ZERO/CONSTANT/LIVE) and value where known."""

    state: np.ndarray  # int8, one per channel
    value: np.ndarray  # float64; 0 for ZERO, the constant for CONSTANT, nan for LIVE
    # Where a channel is several parts stacked on another axis (a head of a packed q/k/v tensor: its
    # query, key and value parts), which parts are ZERO, per part and channel; None where not known.
    zero_parts: np.ndarray | None = None
    # Where a channel is a head of Dh features on the value's last axis: per head, the features' values
    # where all of them are known (nan elsewhere), shape (heads, Dh); None where not known.
    head_values: np.ndarray | None = None

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
