"""Forward channel analysis of an ONNX graph: which channels are exactly zero or constant.

For every tensor with a channel axis (axis 1), each channel is ZERO, CONSTANT(value) or LIVE,
propagated from the weights through the graph. One handler per op type, registered by
decorator; an op without a handler is a wall (every channel it writes is LIVE), so an unknown
op is never taken for an elementwise one. The states are facts about every input: the rewrite
passes may delete ZERO channels and fold CONSTANT ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

ZERO, CONSTANT, LIVE = 0, 1, 2


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

    def with_live(self, live: np.ndarray) -> Channels:
        state = np.where(live, LIVE, self.state).astype(np.int8)
        return Channels(state, np.where(live, np.nan, self.value))


Handler = Callable[[ir.Node, list["Channels | None"]], "list[Channels | None]"]
_HANDLERS: dict[str, Handler] = {}


def register(*op_types: str):
    def wrap(fn: Handler) -> Handler:
        for op in op_types:
            _HANDLERS[op] = fn
        return fn
    return wrap


def handled_ops() -> tuple[str, ...]:
    return tuple(sorted(_HANDLERS))


def const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return np.asarray(value.const_value.numpy(), dtype=np.float64)


def channel_count(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
        return None
    return int(shape[1])


def attr_value(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def analyze(model: ir.Model) -> dict[str, Channels]:
    """Channel states of every value with a channel axis, keyed by value name."""
    states: dict[str, Channels] = {}

    def of(v: ir.Value | None) -> Channels | None:
        if v is None:
            return None
        if v.name in states:
            return states[v.name]
        c = const_array(v)
        if c is not None:
            return None  # initializers are read by the handlers themselves
        n = channel_count(v)
        return Channels.live(n) if n is not None else None

    for node in model.graph:  # onnx_ir iterates in topological order for a valid model
        ins = [of(v) for v in node.inputs]
        handler = _HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        outs = handler(node, ins) if handler is not None else [None] * len(node.outputs)
        for v, ch in zip(node.outputs, outs, strict=False):
            n = channel_count(v)
            if n is None:
                continue
            if ch is None or len(ch) != n:
                ch = Channels.live(n)
            states[v.name] = ch
    return states


# ---- Unary elementwise ops: each channel maps through f, so a known channel stays known.

def _unary(f: Callable[[np.ndarray, ir.Node], np.ndarray]) -> Handler:
    def handler(node: ir.Node, ins: list[Channels | None]) -> list[Channels | None]:
        x = ins[0]
        if x is None:
            return [None]
        vals = np.where(x.is_known, x.value, 0.0)
        out = Channels.known(f(vals, node))
        return [out.with_live(~x.is_known)]
    return handler


_UNARY = {
    "Relu": lambda v, n: np.maximum(v, 0),
    "LeakyRelu": lambda v, n: np.where(v >= 0, v, attr_value(n, "alpha", 0.01) * v),
    "Sigmoid": lambda v, n: 1 / (1 + np.exp(-v)),
    "Tanh": lambda v, n: np.tanh(v),
    "HardSigmoid": lambda v, n: np.clip(attr_value(n, "alpha", 0.2) * v + attr_value(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda v, n: v * np.clip(v / 6 + 0.5, 0, 1),
    "Elu": lambda v, n: np.where(v > 0, v, attr_value(n, "alpha", 1.0) * (np.exp(v) - 1)),
    "Selu": lambda v, n: attr_value(n, "gamma", 1.0507009873554805) * np.where(
        v > 0, v, attr_value(n, "alpha", 1.6732632423543772) * (np.exp(v) - 1)),
    "Softplus": lambda v, n: np.log1p(np.exp(v)),
    "Identity": lambda v, n: v,
    "Neg": lambda v, n: -v,
}
for _op, _f in _UNARY.items():
    register(_op)(_unary(_f))


@register("Dropout")
def _dropout(node, ins):
    return [ins[0], None]


@register("Clip")
def _clip(node, ins):
    lo = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    hi = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if (len(node.inputs) > 1 and node.inputs[1] is not None and lo is None) or (
            len(node.inputs) > 2 and node.inputs[2] is not None and hi is None):
        return [None]
    lo_v = float(lo) if lo is not None else -np.inf
    hi_v = float(hi) if hi is not None else np.inf
    return _unary(lambda v, n: np.clip(v, lo_v, hi_v))(node, ins)


# ---- Ops that keep each channel apart and keep a constant channel constant.

@register("MaxPool", "GlobalAveragePool", "GlobalMaxPool")
def _pool(node, ins):
    return [ins[0]] + [None] * (len(node.outputs) - 1)


@register("AveragePool")
def _avg_pool(node, ins):
    x = ins[0]
    pads = attr_value(node, "pads", None)
    if x is not None and attr_value(node, "count_include_pad", 0) and pads and any(pads):
        # Zero padding enters the average: a nonzero constant channel varies at the border.
        return [x.with_live(x.state == CONSTANT)]
    return [x]


@register("ReduceMean", "ReduceMax")
def _reduce_space(node, ins):
    axes = attr_value(node, "axes", None)
    if axes is None and len(node.inputs) > 1:
        c = const_array(node.inputs[1])
        axes = None if c is None else [int(a) for a in np.atleast_1d(c)]
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if ins[0] is None or not axes or rank is None or any(a % rank < 2 for a in axes):
        return [None]
    return [ins[0]]


# ---- Layers with weights.

@register("Conv")
def _conv(node, ins):
    x = ins[0]
    w = const_array(node.inputs[1])
    if x is None or w is None:
        return [None]
    b = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(w.shape[0])
    group = int(attr_value(node, "group", 1))
    pads = attr_value(node, "pads", None)
    padded = bool(pads and any(pads)) or attr_value(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID")
    out_ch, in_per_group = w.shape[0], w.shape[1]
    state = np.empty(out_ch, np.int8)
    value = np.empty(out_ch)
    per_group_out = out_ch // group
    for n in range(out_ch):
        g = n // per_group_out
        idx = np.arange(g * in_per_group, (g + 1) * in_per_group)
        wn = w[n].reshape(in_per_group, -1)
        uses = np.abs(wn).sum(1) > 0
        xs = x.state[idx]
        if np.any(uses & (xs == LIVE)) or (padded and np.any(uses & (xs == CONSTANT))):
            state[n], value[n] = LIVE, np.nan
            continue
        total = b[n] + float(np.sum(np.where(uses, np.nan_to_num(x.value[idx]), 0.0) * wn.sum(1)))
        state[n], value[n] = (ZERO, 0.0) if total == 0 else (CONSTANT, total)
    return [Channels(state, value)]


@register("BatchNormalization")
def _batch_norm(node, ins):
    x = ins[0]
    scale, bias, mean, var = (const_array(v) for v in node.inputs[1:5])
    if x is None or any(t is None for t in (scale, bias, mean, var)):
        return [None] * len(node.outputs)
    eps = float(attr_value(node, "epsilon", 1e-5))
    a = scale / np.sqrt(var + eps)
    vals = a * (np.where(x.is_known, x.value, 0.0) - mean) + bias
    out = Channels.known(vals)
    live = ~x.is_known & (scale != 0)
    return [out.with_live(live)] + [None] * (len(node.outputs) - 1)


@register("Gemm")
def _gemm(node, ins):
    x = ins[0]
    w = const_array(node.inputs[1])
    if x is None or w is None or attr_value(node, "transA", 0):
        return [None]
    w = w.T if attr_value(node, "transB", 0) else w  # (in, out)
    alpha, beta = float(attr_value(node, "alpha", 1.0)), float(attr_value(node, "beta", 1.0))
    c = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    bias = np.broadcast_to(beta * c, (w.shape[1],)) if c is not None else np.zeros(w.shape[1])
    if len(node.inputs) > 2 and node.inputs[2] is not None and c is None:
        return [None]
    uses = np.abs(w) > 0  # (in, out)
    live = (uses & (x.state == LIVE)[:, None]).any(0)
    vals = bias + alpha * (np.nan_to_num(np.where(x.is_known, x.value, 0.0)) @ w)
    return [Channels.known(vals).with_live(live)]


# ---- Shape ops that carry channels.

@register("Flatten")
def _flatten(node, ins):
    x = ins[0]
    shape = node.inputs[0].shape
    if x is None or int(attr_value(node, "axis", 1)) != 1 or shape is None:
        return [None]
    dims = list(shape)[2:]
    if not all(isinstance(d, int) for d in dims):
        return [None]
    spatial = int(np.prod(dims)) if dims else 1
    return [Channels(np.repeat(x.state, spatial), np.repeat(x.value, spatial))]


@register("Concat")
def _concat(node, ins):
    rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
    axis = int(attr_value(node, "axis", 0))
    if rank is None or axis % rank != 1 or any(c is None for c in ins):
        return [None]
    return [Channels(np.concatenate([c.state for c in ins]), np.concatenate([c.value for c in ins]))]


# ---- Binary elementwise ops, with tensors or with constants that broadcast over channels.

def channel_operand(v: ir.Value, ch: Channels | None, n: int, out_rank: int) -> Channels | None:
    if ch is not None:
        return ch if len(ch) == n else None
    c = const_array(v)
    if c is None or c.ndim > out_rank:
        return None
    if c.size == 1:
        return Channels.known(np.full(n, float(c.reshape(-1)[0])))
    # One value per channel only when it broadcasts along axis 1 alone: (C,1,1), (1,C,1,1), ...
    shape = (1,) * (out_rank - c.ndim) + c.shape
    if shape[1] == n and int(np.prod(shape)) == n:
        return Channels.known(c.reshape(-1))
    return None


def _binary(op: Callable[[np.ndarray, np.ndarray], np.ndarray], zero_absorbs: bool = False) -> Handler:
    def handler(node, ins):
        n = channel_count(node.outputs[0])
        if n is None:
            return [None]
        rank = len(node.outputs[0].shape)
        a = channel_operand(node.inputs[0], ins[0], n, rank)
        b = channel_operand(node.inputs[1], ins[1], n, rank)
        if a is None or b is None:
            return [None]
        both = a.is_known & b.is_known
        with np.errstate(divide="ignore", invalid="ignore"):
            vals = op(np.where(both, a.value, 0.0), np.where(both, b.value, 1.0))
        out = Channels.known(np.where(both, vals, 0.0))
        live = ~both
        if zero_absorbs:  # 0 * anything = 0
            live &= ~((a.state == ZERO) | (b.state == ZERO))
        bad = both & ~np.isfinite(vals)
        return [out.with_live(live | bad)]
    return handler


register("Add")(_binary(np.add))
register("Sub")(_binary(np.subtract))
register("Mul")(_binary(np.multiply, zero_absorbs=True))
register("Div")(_binary(np.divide))
