"""Elementwise ops: each output channel is computed from the same channel of the inputs.

Unary ops map a known channel through f (mind f(0) != 0: Sigmoid(0) = 0.5 turns a zero channel
into a constant one). Binary and n-ary ops merge the channel ids of their tensor operands, since a
channel can only be deleted from all of them at once; a constant operand that broadcasts onto the
channels is sliced along with them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from .base import (
    ZERO,
    Channels,
    Decline,
    OpRule,
    PassThrough,
    attr_value,
    channel_axis,
    channel_constant,
    channel_count,
    const_array,
    const_tensor,
    follow_axis,
    rank_of,
    refine_shape,
    register,
    take_const,
)


class Unary(PassThrough):
    """y = f(x) channel by channel; ``f(values, node)`` maps known channel values (derive from this
    class for an elementwise op of your own)."""

    f: Callable[[np.ndarray, ir.Node], np.ndarray] = staticmethod(lambda v, n: v)
    same_shape = True

    def forward(self, node, ins):
        x = ins[0]
        if x is None:
            return [None] * len(node.outputs)
        with np.errstate(all="ignore"):
            vals = np.asarray(self.f(x.known_values, node), np.float64)
        bad = ~np.isfinite(vals)  # log(0), 1/0: leave such a channel LIVE rather than fold an infinity
        out = Channels.known(np.where(bad, 0.0, vals)).with_live(~x.is_known | bad)
        return [out] + [None] * (len(node.outputs) - 1)

    def couple(self, node, ids, ctx):
        # A second output (Dropout's mask) has the input's channels too; anyone reading it is a wall.
        if any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[1:]):
            return None
        return super().couple(node, ids, ctx)


def _unary(op: str, f: Callable[[np.ndarray, ir.Node], np.ndarray]) -> None:
    register(op)(type(f"Unary{op}", (Unary,), {"f": staticmethod(f)}))


_UNARY: dict[str, Callable[[np.ndarray, ir.Node], np.ndarray]] = {
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
    "Gelu": lambda v, n: _gelu(v, attr_value(n, "approximate", "none")),
    "Identity": lambda v, n: v,
    "Neg": lambda v, n: -v,
    "Dropout": lambda v, n: v,  # inference: the identity
    "Abs": lambda v, n: np.abs(v),
    "Sqrt": lambda v, n: np.sqrt(v),
    "Exp": lambda v, n: np.exp(v),
    "Log": lambda v, n: np.log(v),
    "Reciprocal": lambda v, n: 1 / v,
    "Erf": lambda v, n: np.vectorize(__import__("math").erf)(v) if np.size(v) else v,
    # Tests of a value (false, 0, for any number): dynamo's scaled_dot_product_attention zeroes the NaN rows of
    # a fully masked softmax with Where(IsNaN(p), 0, p), head by head.
    "IsNaN": lambda v, n: np.isnan(v).astype(np.float64),
    "IsInf": lambda v, n: ((np.isposinf(v) & bool(attr_value(n, "detect_positive", 1)))
                           | (np.isneginf(v) & bool(attr_value(n, "detect_negative", 1)))).astype(np.float64),
}


def _gelu(v: np.ndarray, approximate: str) -> np.ndarray:
    from math import erf, pi, sqrt

    if approximate == "tanh":
        return 0.5 * v * (1 + np.tanh(sqrt(2 / pi) * (v + 0.044715 * v ** 3)))
    return np.array([0.5 * x * (1 + erf(x / sqrt(2))) for x in np.ravel(v)]).reshape(np.shape(v))


for _op, _f in _UNARY.items():
    _unary(_op, _f)


@register("Clip")
class Clip(Unary):
    def forward(self, node, ins):
        bounds = []
        for i in (1, 2):
            v = node.inputs[i] if len(node.inputs) > i else None
            c = const_array(v)
            if v is not None and c is None:
                return [None]  # a bound computed at run time
            bounds.append(None if c is None else float(c))
        lo = bounds[0] if bounds[0] is not None else float(attr_value(node, "min", -np.inf))
        hi = bounds[1] if bounds[1] is not None else float(attr_value(node, "max", np.inf))
        x = ins[0]
        if x is None:
            return [None]
        return [Channels.known(np.clip(x.known_values, lo, hi)).with_live(~x.is_known)]


@register("PRelu")
class PRelu(PassThrough):
    """x where x >= 0, slope * x elsewhere; the slope may hold one value per channel."""

    def forward(self, node, ins):
        x = ins[0]
        n = channel_count(node.outputs[0])
        slope = _per_channel(node.inputs[1], node.outputs[0], n) if n and x is not None else None
        if slope is None:
            return [None]
        s, _ = slope
        v = x.known_values
        out = Channels.known(np.where(v >= 0, v, np.nan_to_num(s.value) * v))
        # A negative constant times a slope that varies over space is no longer constant.
        return [out.with_live(~x.is_known | ((v < 0) & ~s.is_known))]

    def couple(self, node, ids, ctx):
        n = channel_count(node.outputs[0])
        if n is None or _per_channel(node.inputs[1], node.outputs[0], n) is None:
            return Decline("its slope does not broadcast onto the channels")
        return super().couple(node, ids, ctx)

    def rewrite(self, graph, node, keep_in, keep_out):
        return _slice_constants(graph, node, keep_out[0], [1])


def _per_channel(const: ir.Value, out: ir.Value, n: int):
    axis, rank = channel_axis(out), rank_of(out)
    if axis is None or rank is None:
        return None
    return channel_constant(const, n, rank, axis)


def _slice_constants(graph: ir.Graph, node: ir.Node, keep: np.ndarray | None, indices: list[int]) -> bool:
    """Slice the constant operands that hold one entry per channel along their channel axis."""
    if keep is None or keep.all():
        return False
    out = node.outputs[0]
    changed = False
    for i in indices:
        v = node.inputs[i] if len(node.inputs) > i else None
        if v is None or const_tensor(v) is None:
            continue
        seen = _per_channel(v, out, len(keep))
        if seen is None or seen[1] < 0:
            continue
        # take_const: a quantized constant (DequantizeLinear of an initializer) stays quantized.
        take_const(graph, node, i, lambda c, axis=seen[1]: np.compress(keep, c, axis=axis))
        changed = True
    return changed


class Elementwise(OpRule):
    """Add, Sub, Mul, Div, Sum, Max, Min: channel c of the output reads channel c of each operand."""

    absorbs_zero = False  # Mul: 0 * anything = 0

    def combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def out_axes(self, node):
        tensors = [v for v in node.inputs if v is not None and const_tensor(v) is None]
        # The channels of an operand of the output's own rank, where there is one: a lower-rank operand
        # (attention's mask (S, S) added to scores (B, H, S, S)) broadcasts over them.
        full = [v for v in tensors if rank_of(v) is not None and rank_of(v) == rank_of(node.outputs[0])]
        return [follow_axis((full or tensors)[0], node.outputs[0]) if tensors else 1]

    def fill_shapes(self, node):
        """Operands of one rank whose sizes agree (or are 1) give the output those sizes, symbols included."""
        shapes = [list(v.shape) for v in node.inputs if v is not None and v.shape is not None]
        if len(shapes) != len([v for v in node.inputs if v is not None]) or len({len(s) for s in shapes}) != 1:
            return
        dims = []
        for sizes in zip(*shapes, strict=True):
            big = {d for d in sizes if d != 1}
            dims.append(big.pop() if len(big) == 1 else (1 if not big else None))
        refine_shape(node.outputs[0], dims)

    def operands(self, node: ir.Node, ins: list[Channels | None]) -> list[Channels] | None:
        out = node.outputs[0]
        n = channel_count(out)
        if n is None:
            return None
        ops = []
        for v, ch in zip(node.inputs, ins, strict=False):
            if ch is not None and self.aligned(node, v, ch):
                ops.append(ch)
                continue
            seen = _per_channel(v, out, n) if v is not None and const_tensor(v) is not None else None
            if seen is None and v is not None and _same_for_every_channel(v, out, ch is not None):
                ops.append(Channels.live(n))  # a tensor read alike by every channel: known nowhere
                continue
            if seen is None:
                return None
            ops.append(seen[0])
        return ops

    def aligned(self, node: ir.Node, v: ir.Value | None, ch) -> bool:
        """Whether operand ``v`` carries the output's channels, one for one on the same axis."""
        out = node.outputs[0]
        return ch is not None and len(ch) == channel_count(out) and rank_of(v) == rank_of(out) \
            and channel_axis(v) == channel_axis(out)

    def forward(self, node, ins):
        ops = self.operands(node, ins)
        if not ops:
            return [None]
        acc = ops[0]
        for b in ops[1:]:
            both = acc.is_known & b.is_known
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                vals = self.combine(np.where(both, acc.value, 0.0), np.where(both, b.value, 1.0))
            live = ~both | (both & ~np.isfinite(vals))
            if self.absorbs_zero:
                live &= ~((acc.state == ZERO) | (b.state == ZERO))
            acc = Channels.known(np.where(both & np.isfinite(vals), vals, 0.0)).with_live(live)
        return [acc]

    def couple(self, node, ids, ctx):
        if self.operands(node, [None if i is None else _placeholder(len(i)) for i in ids]) is None:
            return Decline("its operands do not line up channel by channel")
        # Operands read alike by every channel (broadcast over them) keep their own channels, all needed.
        tensors = [i for v, i in zip(node.inputs, ids, strict=False)
                   if i is not None and self.aligned(node, v, _placeholder(len(i)))]
        if not tensors:
            return Decline("no operand's channels can be followed")
        for other in tensors[1:]:
            for a, b in zip(tensors[0], other, strict=True):
                ctx.union(a, b)
        return [list(tensors[0])]

    def backward(self, node, needed, ins):
        return [needed[0] if self.aligned(node, v, ch) else None for v, ch in zip(node.inputs, ins, strict=False)]

    def rewrite(self, graph, node, keep_in, keep_out):
        return _slice_constants(graph, node, keep_out[0], list(range(len(node.inputs))))


def _same_for_every_channel(v: ir.Value, out: ir.Value, has_channels: bool) -> bool:
    """A tensor operand that does not reach the output's channel axis, or has size 1 there where it
    carries no channels of its own. A statistic over the channels (a LayerNorm written out: x - mean(x))
    carries one and stays a wall: deleting a channel would change it."""
    rank, r, axis = rank_of(out), rank_of(v), channel_axis(out)
    if rank is None or r is None or axis is None or r > rank:
        return False
    own = axis - (rank - r)
    return own < 0 or (v.shape[own] == 1 and not has_channels)


def _placeholder(n: int) -> Channels:
    return Channels.live(n)


def _binary(op: str, f: Callable[[np.ndarray, np.ndarray], np.ndarray], absorbs_zero: bool = False) -> None:
    register(op)(type(f"Elementwise{op}", (Elementwise,),
                      {"combine": staticmethod(f), "absorbs_zero": absorbs_zero}))


_binary("Add", np.add)
_binary("Sum", np.add)
_binary("Sub", np.subtract)
_binary("Mul", np.multiply, absorbs_zero=True)
_binary("Div", np.divide)
_binary("Max", np.maximum)
_binary("Min", np.minimum)
_binary("Pow", np.power)


@register("Where")
class Where(Elementwise):
    """Where(cond, x, y): channel c is x's or y's channel c, position by position (attention's causal
    mask: masked_fill). Known only where x and y hold the same known value."""

    def forward(self, node, ins):
        ops = self.operands(node, ins)
        if not ops or len(ops) != 3:
            return [None]
        x, y = ops[1], ops[2]
        same = x.is_known & y.is_known & (x.value == y.value)
        return [Channels.known(np.where(same, x.known_values, 0.0)).with_live(~same)]
