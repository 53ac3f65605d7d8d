"""Attention heads: the Reshape to heads and back, the two attention MatMuls, Softmax, Gather.

A projection writes its features on the last axis; ``reshape(b, s, H, Dh)`` splits them into heads,
and from there on the value carries one channel per head on the heads axis, the Dh features of a
head inside it (their ids are merged: a head goes whole or not at all). A Transpose carries the
heads axis along; Q @ K^T and P @ V multiply head by head, so the heads of their operands and of
their output are the same heads; Softmax over keys normalises each head on its own; the Reshape
back to (b, s, H * Dh) spreads each head over its Dh features again, which the output projection
reads. A head whose value rows (and bias) are zero gives a zero P @ V head; one whose output
projection columns are zero is needed by no one: either way no value needs the head, and its
query and key rows (which feed only its own softmax) go with it. A head whose value rows are zero
but whose bias is not gives its bias at every query (the softmax rows sum to 1): a constant, which
the folding pass moves into the output projection's bias (``Channels.head_values`` carries it
from the Reshape to heads through P @ V to the Reshape back).

A packed projection splits into (..., 3, H, Dh) (or (..., 3, D)): a head is then its query, key and
value parts together, and the analysis keeps which parts are zero (``Channels.zero_parts``) until
a Gather, Split or Slice picks one part out, so a head with zero value rows is still found.

The targets of the Reshapes name the head count H (split) or H * Dh (merge): rewritten where they
are constants, inferred (-1) or built by Concat around constants; a count read at run time from
another value makes the Reshape a wall. A Reshape that merges the heads into the batch axis is a
wall too (the heads would run on the batch axis), unless the prepare pass in head_round_trips.py
wrote the trip through the batch axis as Transposes (nn.MultiheadAttention, dynamo's K^T).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import (
    LIVE,
    ZERO,
    Channels,
    Decline,
    PassThrough,
    attr_value,
    channel_axis,
    channel_count,
    const_tensor,
    input_or_none,
    label,
    opset_of,
    rank_of,
    register,
)
from .dims import Dim, merge_refs, target_of, write_dim
from .layers import MatMul
from .shape import Reshape, Slice, Split


def _same_dims(a: list, b: list) -> bool:
    """Sizes that are the same: equal integers, or the same named symbol."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, int) or isinstance(y, int):
            if x != y:
                return False
        elif x is None or y is None or getattr(x, "value", None) is None or x != y:
            return False
    return True


@dataclass(frozen=True)
class HeadPlan:
    """How a Reshape moves heads: ``split`` (..., G * H * Dh) -> (..., [G,] H, Dh), ``merge``
    (..., H, Dh) -> (..., H * Dh), or ``repeat`` (B, H, R, ...) -> (B, H * R, ...), where ``head_dim``
    holds R; ``entry`` is the target entry (and output axis) that names H (or H * Dh, H * R);
    ``groups`` parts (q, k, v) stacked before the heads."""

    kind: str
    heads: int
    head_dim: int
    groups: int
    entry: int
    vec: list[Dim]


def head_plan(node) -> HeadPlan | None:
    """The heads plan of a Reshape, None where it neither splits the last axis into heads nor merges
    the heads axis with the one after it."""
    x, y = node.inputs[0], node.outputs[0]
    a, n = channel_axis(x), channel_count(x)
    vec = target_of(node, 1)
    if a is None or n is None or vec is None or x.shape is None or y.shape is None or len(vec) != len(y.shape):
        return None
    if int(attr_value(node, "allowzero", 0)) and any(d.value == 0 for d in vec):
        return None
    xs, ys = list(x.shape), list(y.shape)
    rx, ry = len(xs), len(ys)
    # The last axis split into (H, Dh), (3, D) or (3, H, Dh): the trailing sizes multiply to the channel
    # count, so in row-major order each element keeps its place among the channels whatever the leading
    # axes do (the same (B, S), or tokens flattened into rows for a Gemm regrouped into (B, S)).
    for k in (2, 3) if a == rx - 1 else ():
        tail = ys[ry - k:] if ry > k else []
        if not tail or not all(isinstance(d, int) for d in tail) or int(np.prod(tail)) != n:
            continue
        if k == 2 and _parts_picked(y, ry - 2):
            # (..., 3 * D) -> (..., 3, D), then q, k and v picked apart: parts of D channels each.
            return HeadPlan("split", tail[-1], 1, tail[-2], ry - 1, vec)
        if tail[-1] > 1:
            groups = tail[0] if k == 3 else 1
            return HeadPlan("split", tail[-2], tail[-1], groups, ry - 2, vec)
    if a == rx - 2 and isinstance(xs[-1], int) and ys[-1] == n * xs[-1] and (
            _same_prefix(vec, ys[:-1], xs[:a]) or _names_merged_width(vec[-1], n * xs[-1])):
        return HeadPlan("merge", n, xs[-1], 1, ry - 1, vec)
    copies = xs[a + 1] if 0 < a < rx - 2 else None
    if isinstance(copies, int) and ry == rx - 1 and ys[a] == n * copies and _keeps_other_axes(vec, xs, ys, a):
        # The channel axis merged with the one after it, each channel becoming R in a row: grouped-query
        # attention's (B, Hkv, R, S, Dh) -> (B, Hkv * R, S, Dh), each key/value head repeated for the R query
        # heads that share it (an Unsqueeze and an Expand or Tile before), or a CNN's (N, C, H, W) ->
        # (N, C * H, W) before a sequence model.
        return HeadPlan("repeat", n, copies, 1, a, vec)
    return None


def _keeps_other_axes(vec: list[Dim], xs: list, ys: list, a: int) -> bool:
    """Whether a Reshape merging axes a and a + 1 keeps every other axis: the same sizes before and after,
    or the target's entries after the merge literal and the one before it inferred (-1, the batch)."""
    if not _same_dims(ys[a + 1:], xs[a + 2:]):
        return False
    if _same_dims(ys[:a], xs[:a]):
        return True
    literal = all(d.ref is None and d.value == x for d, x in zip(vec[a + 1:], xs[a + 2:], strict=True))
    return a == 1 and vec[0].value == -1 and literal and vec[a].value == ys[a]


def _names_merged_width(last: Dim, width: int) -> bool:
    """Whether the target's last entry is the literal H * Dh: then the leading entries hold the rest of the
    elements whatever they say (symbols inference named apart included), and each element keeps its place
    h * Dh + d along the merged axis."""
    return last.ref is None and last.value == width


def _same_prefix(vec: list[Dim], ys: list, xs: list) -> bool:
    """Whether the output's leading sizes hold the input's leading sizes (the same, or merged) whatever
    the channel count: the same sizes, equal products of known sizes, or one axis the target infers."""
    if _same_dims(ys, xs):
        return True
    if all(isinstance(d, int) for d in ys + xs):
        return int(np.prod(ys)) == int(np.prod(xs))
    return len(ys) == 1 and vec[0].value == -1


def _parts_picked(value, axis: int, depth: int = 0) -> bool:
    """Whether every reader of ``value`` picks single entries along ``axis`` (Gather of a scalar, Split
    into ones, Slice of one), through Unsqueeze, Squeeze and Transpose."""
    uses = list(value.uses())
    if not uses or value.is_graph_output() or depth > 6:
        return False
    for use in uses:
        node = use.node
        if use.idx != 0:
            return False
        op, rank = node.op_type, rank_of(value)
        nxt = _axis_after(node, axis) if op in ("Unsqueeze", "Squeeze", "Transpose") else None
        if nxt is not None:
            if not _parts_picked(node.outputs[0], nxt, depth + 1):
                return False
        elif op == "Gather":
            idx = const_tensor(input_or_none(node, 1))
            if idx is None or idx.ndim != 0 or int(attr_value(node, "axis", 0)) % rank != axis:
                return False
        elif op == "Split":
            if int(attr_value(node, "axis", 0)) % rank != axis or any(
                    v.shape is None or v.shape[axis] != 1 for v in node.outputs):
                return False
        elif op == "Slice":
            axes = const_tensor(input_or_none(node, 3))
            y = node.outputs[0]
            if axes is None or [int(a) % rank for a in np.atleast_1d(axes)] != [axis] or y.shape is None \
                    or y.shape[axis] != 1:
                return False
        else:
            return False
    return True


def _axis_after(node, axis: int) -> int | None:
    """Where ``axis`` of the input lands in the output of a Transpose, Unsqueeze or Squeeze."""
    x, y = node.inputs[0], node.outputs[0]
    rx, ry = rank_of(x), rank_of(y)
    if rx is None or ry is None:
        return None
    if node.op_type == "Transpose":
        perm = [int(p) for p in attr_value(node, "perm", list(range(rx))[::-1])]
        return perm.index(axis) if axis in perm else None
    axes = _const_axes(node)
    if axes is None:
        return None
    if node.op_type == "Unsqueeze":
        kept = [i for i in range(ry) if i not in {a % ry for a in axes}]
        return kept[axis] if axis < len(kept) else None
    removed = {a % rx for a in axes}
    return None if axis in removed else axis - sum(r < axis for r in removed)


def _axis_before(node, axis: int) -> int | None:
    """Which input axis ``axis`` of the output of a Transpose, Unsqueeze or Squeeze comes from."""
    rx = rank_of(node.inputs[0])
    if rx is None:
        return None
    for i in range(rx):
        if _axis_after(node, i) == axis:
            return i
    return None


def _const_axes(node) -> list[int] | None:
    axes = attr_value(node, "axes", None)
    if axes is None:
        c = const_tensor(input_or_none(node, 1))
        axes = None if c is None else [int(a) for a in np.atleast_1d(c)]
    return None if axes is None else [int(a) for a in axes]


@register("Reshape")
class HeadReshape(Reshape):
    """Reshape with the heads plans first; everything else as before (flatten, keep the channel axis)."""

    def _heads(self, node) -> HeadPlan | None:
        plan = head_plan(node)
        if plan is not None and plan.kind == "merge" and channel_axis(node.inputs[0]) == 1 \
                and self._kind(node) == "flatten":
            return None  # (N, C, L) -> (N, C * L): the flatten it has always been
        return plan

    def in_axes(self, node):
        return super().in_axes(node) if self._heads(node) is None else [None, None]

    def out_axes(self, node):
        plan = self._heads(node)
        if plan is None:
            return super().out_axes(node)
        return [plan.entry]

    def forward(self, node, ins):
        plan, x = self._heads(node), ins[0]
        if plan is None:
            return super().forward(node, ins)
        if x is None:
            return [None]
        if plan.kind == "repeat":
            values = None if x.head_values is None else np.repeat(x.head_values, plan.head_dim, axis=0)
            return [Channels(np.repeat(x.state, plan.head_dim), np.repeat(x.value, plan.head_dim), None, values)]
        if plan.kind == "merge":
            out = Channels(np.repeat(x.state, plan.head_dim), np.repeat(x.value, plan.head_dim))
            src = _behind_transposes(node.inputs[0])
            if x.head_values is not None and src is not None and _per_head_operands(src) is not None:
                # P @ V heads whose value features are constants: those features are constants here.
                vals = x.head_values.reshape(-1)
                out = Channels.known(np.where(np.isnan(vals), 0.0, vals)).with_live(np.isnan(vals) & (out.state != ZERO))
            return [out]
        parts = np.all(x.state.reshape(plan.groups, plan.heads, plan.head_dim) == ZERO, axis=2)  # (G, H)
        zero = parts.all(0)
        values = None
        if plan.groups == 1:
            known = x.is_known.reshape(plan.heads, plan.head_dim)
            values = np.where(known.all(1)[:, None], x.known_values.reshape(plan.heads, plan.head_dim), np.nan)
        return [Channels(np.where(zero, ZERO, LIVE).astype(np.int8), np.where(zero, 0.0, np.nan),
                         parts if plan.groups > 1 else None, values)]

    def couple(self, node, ids, ctx):
        plan = self._heads(node)
        if plan is None:
            return super().couple(node, ids, ctx)
        why = label(node)
        d = plan.vec[plan.entry]
        if ids[0] is None:
            merge_refs(ctx, plan.vec, None, None, why)
            return Decline("its input's channels cannot be followed")
        if d.ref is not None or (d.value != -1 and d.site is None):
            merge_refs(ctx, plan.vec, None, None, why)
            what = {"split": "head count", "merge": "width of the heads", "repeat": "count of repeated heads"}[plan.kind]
            return Decline(f"its target names the {what} where it cannot be rewritten (read at run time)")
        merge_refs(ctx, plan.vec, None, None, why)
        if plan.kind in ("merge", "repeat"):
            return [[i for i in ids[0] for _ in range(plan.head_dim)]]
        x = np.array(ids[0]).reshape(plan.groups, plan.heads, plan.head_dim)
        for h in range(plan.heads):
            first = int(x[0, h, 0])
            for other in x[:, h, :].reshape(-1)[1:]:
                ctx.union(first, int(other))
        return [[int(x[0, h, 0]) for h in range(plan.heads)]]

    def backward(self, node, needed, ins):
        plan = self._heads(node)
        if plan is None:
            return super().backward(node, needed, ins)
        if needed[0] is None:
            return [None, None]
        if plan.kind in ("merge", "repeat"):
            return [needed[0].reshape(-1, plan.head_dim).any(1), None]
        per = np.broadcast_to(needed[0][None, :, None], (plan.groups, plan.heads, plan.head_dim))
        return [per.reshape(-1).copy(), None]

    def rewrite(self, graph, node, keep_in, keep_out):
        plan = self._heads(node)  # shapes are still the uncut ones here
        if plan is None:
            return super().rewrite(graph, node, keep_in, keep_out)
        d = plan.vec[plan.entry]
        if keep_out[0] is None or d.value == -1:
            return False
        return write_dim(graph, d, int(keep_out[0].sum()))


def is_group_axis(value, axis: int) -> bool:
    """Whether ``axis`` of ``value`` stacks the parts of packed heads (q, k, v): followed back through
    Transposes to the Reshape that split them."""
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            return False
        if node.op_type in ("Transpose", "Unsqueeze", "Squeeze"):
            before = _axis_before(node, axis)
            if before is None:
                return False
            value, axis = node.inputs[0], before
            continue
        plan = head_plan(node) if node.op_type == "Reshape" else None
        return plan is not None and plan.groups > 1 and axis == plan.entry - 1
    return False


def part_of(node, x: Channels | None, axis: int, index: int) -> Channels | None:
    """The channels of part ``index`` along ``axis`` of a packed value: ZERO where that part is."""
    if x is None or x.zero_parts is None or not 0 <= index < x.zero_parts.shape[0]:
        return x
    if not is_group_axis(node.inputs[0], axis):
        return x
    zero = x.zero_parts[index] | (x.state == ZERO)
    return Channels(np.where(zero, ZERO, x.state).astype(np.int8), np.where(zero, 0.0, x.value))


def _per_head_operands(node) -> int | None:
    """The heads axis of a MatMul of two activations that multiplies head by head (Q @ K^T, P @ V):
    both operands carry their channels on the same axis before the two matrix axes, equally many."""
    a, b = node.inputs[0], input_or_none(node, 1)
    ra, rb = rank_of(a), rank_of(b)
    if b is None or const_tensor(b) is not None or ra is None or ra != rb or ra < 3:
        return None
    ax, bx = channel_axis(a), channel_axis(b)
    if ax is None or ax != bx or ax >= ra - 2 or channel_count(a) is None or channel_count(a) != channel_count(b):
        return None
    return ax


def _behind_transposes(value) -> object | None:
    """The node that made ``value``, looked for behind Transposes that leave the last axis last (the Dh
    features of heads stay on it)."""
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None or node.op_type != "Transpose":
            return node
        rank = rank_of(value)
        perm = attr_value(node, "perm", None)
        if rank is None or perm is None or int(perm[-1]) != rank - 1:
            return None
        value = node.inputs[0]
    return None


def _softmax_rows(value) -> bool:
    """Whether ``value`` is a Softmax over its last axis alone (each row sums to 1)."""
    node = value.producer() if value is not None else None
    rank = rank_of(value)
    if node is None or node.op_type != "Softmax" or node.domain not in ("", "ai.onnx") or rank is None:
        return False
    version = opset_of(node) or 13
    return int(attr_value(node, "axis", -1 if version >= 13 else 1)) % rank == rank - 1


@register("MatMul")
class HeadMatMul(MatMul):
    """MatMul by a constant weight as before; of two activations, head by head."""

    def in_axes(self, node):
        ax = _per_head_operands(node)
        return super().in_axes(node) if ax is None else [ax, ax]

    def out_axes(self, node):
        ax = _per_head_operands(node)
        return super().out_axes(node) if ax is None else [ax]

    def forward(self, node, ins):
        if _per_head_operands(node) is None:
            return super().forward(node, ins)
        a, b = ins[0], ins[1]
        if a is None or b is None or len(a) != len(b):
            return [None]
        zero = (a.state == ZERO) | (b.state == ZERO)  # a zero head times anything is a zero head
        values = None
        src = _behind_transposes(node.inputs[1])
        if b.head_values is not None and _softmax_rows(node.inputs[0]) and src is not None \
                and src.op_type == "Reshape" and head_plan(src) is not None:
            # P @ V with P a softmax over keys (rows summing to 1): a value head whose features are the
            # same at every key gives those features at every query.
            values = b.head_values
        return [Channels(np.where(zero, ZERO, LIVE).astype(np.int8), np.where(zero, 0.0, np.nan), None, values)]

    def couple(self, node, ids, ctx):
        if _per_head_operands(node) is None:
            return super().couple(node, ids, ctx)
        if ids[0] is None or ids[1] is None or len(ids[0]) != len(ids[1]):
            return Decline("the heads of its operands cannot be followed")
        for i, j in zip(ids[0], ids[1], strict=True):
            ctx.union(i, j)
        return [list(ids[0])]

    def backward(self, node, needed, ins):
        if _per_head_operands(node) is None:
            return super().backward(node, needed, ins)
        return [needed[0], needed[0]]

    def rewrite(self, graph, node, keep_in, keep_out):
        if _per_head_operands(node) is None:
            return super().rewrite(graph, node, keep_in, keep_out)
        return False


@register("Softmax", "LogSoftmax")
class SoftmaxOverOtherAxes(PassThrough):
    """Softmax over keys normalises each head (each channel) on its own: channels pass through. Over
    the channel axis it mixes them: a wall."""

    def _ok(self, node) -> bool:
        x = node.inputs[0]
        rank, ch = rank_of(x), channel_axis(x)
        if rank is None or ch is None:
            return False
        version = opset_of(node) or 13
        axis = int(attr_value(node, "axis", -1 if version >= 13 else 1)) % rank
        # Before opset 13 the input is flattened to 2-D at ``axis``: every axis from there on is normalised.
        return ch < axis if version < 13 else ch != axis

    def forward(self, node, ins):
        return [None]  # a zero row's softmax is 1/n, n the row's length: LIVE

    def couple(self, node, ids, ctx):
        if not self._ok(node):
            return Decline("it normalises across the channels")
        return super().couple(node, ids, ctx)


@register("Gather")
class GatherOtherAxis(PassThrough):
    """Gather with constant indices along an axis other than the channels' (one of q, k, v out of a
    packed tensor): every channel is picked alike, and the channel axis shifts as axes go or come."""

    def _out_axis(self, node) -> int | None:
        x = node.inputs[0]
        idx = const_tensor(input_or_none(node, 1))
        rank, ch = rank_of(x), channel_axis(x)
        if idx is None or rank is None or ch is None:
            return None
        axis = int(attr_value(node, "axis", 0)) % rank
        if axis == ch:
            return None
        return ch + (idx.ndim - 1 if axis < ch else 0)

    def out_axes(self, node):
        return [self._out_axis(node)]

    def forward(self, node, ins):
        if self._out_axis(node) is None:
            return [None]
        idx = const_tensor(input_or_none(node, 1))
        if idx.ndim == 0:  # one of packed q, k, v: its own part's ZERO heads
            axis = int(attr_value(node, "axis", 0)) % rank_of(node.inputs[0])
            return [part_of(node, ins[0], axis, int(idx) % node.inputs[0].shape[axis])
                    if isinstance(node.inputs[0].shape[axis], int) else ins[0]]
        return [ins[0]]

    def couple(self, node, ids, ctx):
        if self._out_axis(node) is None:
            return Decline("it picks along the channel axis, or with indices computed at run time")
        return super().couple(node, ids, ctx)


@register("Split")
class PartsSplit(Split):
    """Split as before; one that unstacks packed q, k and v gives each its own part's ZERO heads."""

    def forward(self, node, ins):
        outs = super().forward(node, ins)
        rank = rank_of(node.inputs[0])
        if not self._across(node) or rank is None:
            return outs
        axis = int(attr_value(node, "axis", 0)) % rank
        if any(v.shape is None or v.shape[axis] != 1 for v in node.outputs):
            return outs
        return [part_of(node, ins[0], axis, i) for i in range(len(node.outputs))]


@register("Slice")
class PartsSlice(Slice):
    """Slice as before; one that takes one of packed q, k and v gives it its own part's ZERO heads."""

    def forward(self, node, ins):
        outs = super().forward(node, ins)
        p, rank = self._params(node), rank_of(node.inputs[0])
        if p is None or rank is None or ins[0] is None or ins[0].zero_parts is None or outs[0] is None:
            return outs
        starts, ends, axes, steps = p
        for i, axis in enumerate(axes):
            if is_group_axis(node.inputs[0], int(axis)) and steps[i] == 1:
                n = ins[0].zero_parts.shape[0]
                picked = list(range(n))[slice(int(starts[i]), int(ends[i]), 1)]
                if len(picked) == 1 and len(outs[0]) == len(ins[0]):  # every channel, one part
                    return [part_of(node, ins[0], int(axis), picked[0])]
        return outs
