"""Statistics across the channels, and parameters with one entry per channel read outside a layer.

ConvNeXt V2's global response normalisation (GRN) divides each channel's L2 norm over the positions by the
mean of those norms over the channels, then scales and shifts each channel by parameters of its own:
`gamma * (x * n) + beta + x` with `n = g / (g.mean(channels) + eps)`. The mean couples every channel, but a
channel that is exactly zero adds zero to the sum it divides, so the channel can still go as long as the
mean keeps its divisor, the original channel count (the surgery rewrites the mean so, and thinning hooks
the forward that takes it, see kept_count.py). What is followed here:

- a norm over axes other than the batch's and the channels' (`torch.linalg.vector_norm`, `torch.norm`): each
  channel's own statistic, zero for a zero channel;
- a mean or sum over the channel axis: a statistic across the channels, the same for every channel. It reads
  the channels without pinning them, but a nonzero channel changes it, so a channel it reads goes only when
  it is zero (its filter group), never because the layers after it stop reading it (`MeanRead`);
- such a statistic with numbers (`+ eps`, a square root), and a channel tensor times it, or divided by it
  where the divisor is kept away from zero (`x / (mean + eps)`): the channels pass and zero stays zero;
- a product with a value of the same channels broadcast over the positions (`x * n`): zero times a finite
  value is zero;
- a channel tensor times, plus or minus a parameter with one entry per channel (GRN's scale and shift): the
  channels pass, and the filter group of channel c owns the entry c (`ChannelParam`), so a zero group leaves
  the channel zero.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .kept_count import raw_dims

aten = torch.ops.aten

_NORM_FUNCTIONS = {torch.norm, torch.linalg.vector_norm, aten.linalg_vector_norm.default}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, aten.mean.dim, aten.sum.dim_IntList}
_REDUCE_METHODS = {"mean", "sum"}
_MUL = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, aten.div.Tensor}
_ADD = {operator.add, operator.iadd, torch.add, aten.add.Tensor}
_SUB = {operator.sub, operator.isub, torch.sub, aten.sub.Tensor}
_MUL_METHODS, _DIV_METHODS, _ADD_METHODS, _SUB_METHODS = {"mul", "mul_"}, {"div", "div_"}, {"add", "add_"}, \
    {"sub", "sub_"}
# Ops of a statistic with numbers: what a normalisation does to its divisor.
_STAT_FUNCTIONS = _MUL | _DIV | _ADD | _SUB | {torch.sqrt, torch.rsqrt, torch.reciprocal, torch.clamp,
                                                torch.clamp_min, aten.sqrt.default, aten.rsqrt.default,
                                                aten.reciprocal.default, aten.clamp.default, aten.clamp_min.default,
                                                aten.expand.default, aten.expand_as.default}
_STAT_METHODS = _MUL_METHODS | _DIV_METHODS | _ADD_METHODS | _SUB_METHODS | {
    "sqrt", "rsqrt", "reciprocal", "clamp", "clamp_min", "expand", "expand_as"}


_STAT_REASON = "a statistic across the channels (a mean or sum over them), the same for every channel"


@dataclass
class ChannelParam:
    """A parameter read outside a layer with one entry per channel along `dim` (GRN's scale and shift)."""

    param: str
    dim: int
    ids: list[int]


@dataclass
class MeanRead:
    """A mean over the channels, in the forward of `module`: a nonzero channel among `ids` changes it."""

    node: str
    module: str
    ids: list[int]
    divides: bool  # a mean (divided by the channel count), not a sum
    dims: tuple[int, ...] | None = None  # as the forward wrote them
    rank: int = 0  # of the tensor it averages


def _kind(node: fx.Node) -> str:
    t, fn = node.target, node.op == "call_function"
    if (fn and t in _MUL) or (not fn and t in _MUL_METHODS):
        return "mul"
    if (fn and t in _DIV) or (not fn and t in _DIV_METHODS):
        return "div"
    if (fn and t in _ADD) or (not fn and t in _ADD_METHODS):
        return "add"
    if (fn and t in _SUB) or (not fn and t in _SUB_METHODS):
        return "sub"
    return ""


def _dims(node: fx.Node, position: int, name: str, rank: int) -> tuple[int, ...] | None:
    d = node.args[position] if len(node.args) > position else node.kwargs.get(name)
    if isinstance(d, int):
        d = (d,)
    if not isinstance(d, (list, tuple)) or not d or not all(isinstance(i, int) for i in d):
        return None
    return tuple(sorted(i % rank for i in d))


def _keepdim(node: fx.Node, position: int) -> bool:
    k = node.args[position] if len(node.args) > position else node.kwargs.get("keepdim", False)
    return bool(k)


def _owner(node: fx.Node) -> str:
    """The module whose forward holds the node (fx and torch.export record it), '' for the model's own."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else v for v in stack.values()]
    return str(paths[-1]) if paths else ""


class Follower:
    """Follows the ops above through one analysis; `read` answers for a node, or None where it does not apply."""

    def __init__(self, b, params: set[str], ids_of: dict, axis_of: dict, shape_of, away_from_zero):
        self.b, self.params, self.ids_of, self.axis_of = b, params, ids_of, axis_of
        self.shape_of, self.away_from_zero = shape_of, away_from_zero
        self.stats: set[fx.Node] = set()  # statistics across the channels
        self.channel_params: list[ChannelParam] = []
        self.means: list[MeanRead] = []

    def _ids(self, v) -> list[int] | None:
        val = self.ids_of.get(v) if isinstance(v, fx.Node) else None
        return val if isinstance(val, list) else None

    def read(self, node: fx.Node):
        """(channel ids, their axis) of `node`, or None where none of the rules above reads it."""
        if node.op not in ("call_function", "call_method") or not node.args:
            return None
        shape = self.shape_of(node)
        src = node.args[0]
        x = self._ids(src)
        src_shape = self.shape_of(src) if isinstance(src, fx.Node) else None
        axis = self.axis_of.get(src, 1)
        if x is not None and src_shape is not None and shape is not None:
            if (node.op == "call_function" and node.target in _NORM_FUNCTIONS) or \
                    (node.op == "call_method" and node.target == "norm"):
                return self._norm(node, x, axis, src_shape, shape)
            if (node.op == "call_function" and node.target in _REDUCE_FUNCTIONS) or \
                    (node.op == "call_method" and node.target in _REDUCE_METHODS):
                return self._mean(node, x, axis, src_shape, shape)
        tensors = [a for a in node.all_input_nodes if self.shape_of(a) is not None or a in self.stats]
        if tensors and all(a in self.stats for a in tensors) and self._on_numbers(node):
            # The statistic with numbers: still the same for every channel.
            return self._stat(node, tensors[0], shape)
        return self._binary(node, shape)

    def _stat(self, node, src, shape):
        """A statistic across the channels: ids of its own, pinned, for anything else that reads it (a layer that
        reads a mean over the features is a layer all the same), none of them the channels it was taken over."""
        self.stats.add(node)
        src_shape, axis = self.shape_of(src), self.axis_of.get(src, 1)
        if shape is None or len(shape) < 2:
            return None, 1
        if src_shape is None or len(src_shape) != len(shape) or not 0 < axis < len(shape):
            axis = 1
        return self.b.fresh(shape[axis], pinned=_STAT_REASON), axis

    def _norm(self, node, x, axis, src_shape, shape):
        rank = len(src_shape)
        dims = _dims(node, 2, "dim", rank)
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("ord", node.kwargs.get("p", 2))
        if dims is None or 0 in dims or axis in dims or p not in (1, 2, "fro") or len(x) != src_shape[axis]:
            return None
        moved = axis if _keepdim(node, 3) else axis - sum(d < axis for d in dims)
        return (list(x), moved) if 0 < moved < len(shape) and shape[moved] == len(x) else None

    def _mean(self, node, x, axis, src_shape, shape):
        rank = len(src_shape)
        dims = _dims(node, 1, "dim", rank)
        if dims is None or axis not in dims or 0 in dims or len(x) != src_shape[axis]:
            return None
        divides = node.target in ("mean", torch.mean, aten.mean.dim)
        written = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        self.means.append(MeanRead(node.name, _owner(node), list(x), divides, raw_dims(written), rank))
        return self._stat(node, node.args[0], shape)

    def _on_numbers(self, node) -> bool:
        """An op of the statistics list whose other operands are numbers (or statistics)."""
        t, fn = node.target, node.op == "call_function"
        if not ((fn and t in _STAT_FUNCTIONS) or (not fn and t in _STAT_METHODS)):
            return False
        return all(isinstance(a, (int, float)) or a in self.stats for a in node.args[:2] if a is not None)

    def _binary(self, node, shape):
        kind = _kind(node)
        if not kind or len(node.args) < 2 or shape is None:
            return None
        a, c = node.args[0], node.args[1]
        if kind in ("mul", "div") and c in self.stats and self._ids(a) is not None:
            if kind == "div" and not self.away_from_zero(c):
                return None  # 0 / 0 could be NaN, not zero
            return self._same(a, shape)
        if kind == "mul" and a in self.stats and self._ids(c) is not None:
            return self._same(c, shape)
        if kind == "mul" and self._ids(a) is not None and self._ids(c) is not None:
            return self._broadcast_product(a, c, shape)
        for t, p in ((a, c), (c, a)):
            if kind != "div" and self._ids(t) is not None and self._param(p):
                return self._with_param(node, t, p, shape)
        return None

    def _same(self, v, shape):
        x, axis = self._ids(v), self.axis_of.get(v, 1)
        if self.shape_of(v) != shape:
            return None
        return list(x), axis

    def _broadcast_product(self, a, c, shape):
        """x * n where n has x's very channels and broadcasts over the positions (or the other way round)."""
        x, y = self._ids(a), self._ids(c)
        axis = self.axis_of.get(a, 1)
        sa, sc = self.shape_of(a), self.shape_of(c)
        if axis != self.axis_of.get(c, 1) or len(x) != len(y) or sa is None or sc is None or len(sa) != len(sc) \
                or sa == sc or shape not in (sa, sc):
            return None
        if any(self.b.root(i) != self.b.root(j) for i, j in zip(x, y)):
            return None  # other channels (a gate's): not this rule
        return list(x), axis

    def _param(self, v) -> bool:
        return isinstance(v, fx.Node) and v.op == "get_attr" and str(v.target) in self.params

    def _with_param(self, node, t, p, shape):
        """A channel tensor with a parameter of one entry per channel: the filter group of channel c owns its
        entry c."""
        x, axis = self._ids(t), self.axis_of.get(t, 1)
        ps, ts = self.shape_of(p), self.shape_of(t)
        if ps is None or ts is None or shape != ts or len(ps) > len(ts):
            return None
        own = axis - (len(ts) - len(ps))
        if own < 0 or ps[own] != len(x) or len(x) < 2 or any(d != 1 for i, d in enumerate(ps) if i != own):
            return None
        name = str(p.target)
        for earlier in self.channel_params:
            if earlier.param == name:
                for i, j in zip(earlier.ids, x):
                    self.b.union(i, j)  # one entry read as two channels: they go together
        self.channel_params.append(ChannelParam(name, own, list(x)))
        return list(x), axis
