"""Shape vectors built at run time (``x.view(x.size(0), -1)``, ``b, c, _, _ = x.size()``,
``.expand_as(x)``) and the ops that read them: Shape and Expand.

A shape vector is read back through Shape, Gather, Slice, Unsqueeze, Squeeze, Concat, Cast and
Identity into one ``Dim`` per entry: a known integer (and where it is written, so a rewrite can
change it), or the size of an axis of some value read at run time. A size read at run time
follows that value when channels go, so it needs no rewrite; but the channel count of a value
may only reach a Reshape or Expand that reads it as the channels of the same channels (their
ids are then merged), never anything else: Shape pins the channels of what it reads otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .base import (
    Channels,
    Decline,
    OpRule,
    attr_value,
    channel_axis,
    channel_count,
    const_tensor,
    follow_axis,
    input_or_none,
    label,
    refine_shape,
    register,
    set_const,
)


@dataclass(frozen=True, eq=False)
class Dim:
    """One entry of a shape vector: ``value`` when known; ``ref`` = (value, axis) when it is the size
    of that axis read at run time; ``site`` = (node, input index, element) where a known entry is
    written as a constant, when it can be rewritten there."""

    value: int | None = None
    ref: tuple[ir.Value, int] | None = None
    site: tuple[ir.Node, int, int] | None = None


# (op, input) that read a shape vector entry by entry and take charge of the channel counts in it.
_TARGETS = {("Reshape", 1), ("Expand", 1), ("Resize", 3)}
_PLUMBING = ("Shape", "Gather", "Slice", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity")


def shape_vector(v: ir.Value | None, _depth: int = 0) -> list[Dim] | None:
    """The entries of an integer vector (a Reshape target, an Expand shape), or None when unreadable."""
    if v is None or _depth > 32:
        return None
    c = const_tensor(v)
    if c is not None:
        if c.dtype.kind not in "iu" or c.ndim > 1:
            return None
        return [Dim(int(x)) for x in np.atleast_1d(c)]
    node = v.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None if node is None else _unknown_entries(v)
    op = node.op_type
    if op == "Shape":
        x = node.inputs[0]
        if x is None or x.shape is None:
            return None
        rank = len(x.shape)
        start = int(attr_value(node, "start", 0))
        end = attr_value(node, "end", None)
        start = start % rank if start < 0 else min(start, rank)
        end = rank if end is None else (int(end) % rank if int(end) < 0 else min(int(end), rank))
        # Read at run time even where the size is static now: it follows x when x loses channels.
        return [Dim(int(x.shape[i]) if isinstance(x.shape[i], int) else None, ref=(x, i)) for i in range(start, end)]
    if op == "Reshape" and v.shape is not None and len(v.shape) == 1:
        inner = shape_vector(node.inputs[0], _depth + 1)
        if inner is not None and isinstance(v.shape[0], int) and len(inner) == v.shape[0]:
            return [_unsited(d) for d in inner]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        inner = shape_vector(node.inputs[0], _depth + 1)
        # Squeeze/Unsqueeze only turn a scalar into a one-entry vector and back here.
        return inner if inner is not None and (op in ("Cast", "Identity") or len(inner) == 1) else None
    if op == "Gather":
        inner = shape_vector(node.inputs[0], _depth + 1)
        idx = const_tensor(input_or_none(node, 1))
        if inner is None or idx is None or int(attr_value(node, "axis", 0)) != 0 or idx.ndim > 1:
            return None
        picked = [int(i) % len(inner) if -len(inner) <= int(i) < len(inner) else None for i in np.atleast_1d(idx)]
        return None if None in picked else [_unsited(inner[i]) for i in picked]
    if op == "Slice":
        inner = shape_vector(node.inputs[0], _depth + 1)
        params = [const_tensor(input_or_none(node, i)) for i in range(1, 5)]
        if inner is None or params[0] is None or params[1] is None or params[0].size != 1:
            return None
        if params[2] is not None and int(params[2].reshape(-1)[0]) not in (0, -1):
            return None
        step = int(params[3].reshape(-1)[0]) if params[3] is not None else 1
        start, end = int(params[0].reshape(-1)[0]), int(params[1].reshape(-1)[0])
        return [_unsited(d) for d in inner[slice(start, end, step)]]
    if op == "Concat":
        out: list[Dim] = []
        for k, part in enumerate(node.inputs):
            inner = shape_vector(part, _depth + 1)
            if inner is None:
                return None
            if const_tensor(part) is not None:
                inner = [Dim(d.value, site=(node, k, j)) for j, d in enumerate(inner)]
            out.extend(inner)
        return out
    if op == "Where":
        return _minus_ones_replaced(node, _depth) or _unknown_entries(v)
    return _unknown_entries(v)


def _minus_ones_replaced(node: ir.Node, depth: int) -> list[Dim] | None:
    """Where(Equal(c, -1), fill, c): the legacy exporter's Expand shape, its -1 entries ("keep this size")
    replaced by ones. The other entries are c's own, written where c writes them."""
    cond, fill, other = (input_or_none(node, i) for i in range(3))
    eq = cond.producer() if cond is not None else None
    if eq is None or eq.op_type != "Equal" or other is None or len(eq.inputs) != 2 or other not in eq.inputs:
        return None
    minus = const_tensor(eq.inputs[1] if eq.inputs[0] is other else eq.inputs[0])
    ones = const_tensor(fill)
    inner = shape_vector(other, depth + 1)
    if inner is None or minus is None or ones is None or not np.all(minus == -1) or ones.size not in (1, len(inner)):
        return None
    ones = np.broadcast_to(ones.reshape(-1), (len(inner),))
    return [Dim(int(ones[j])) if d.value == -1 else d for j, d in enumerate(inner)]


def _unknown_entries(v: ir.Value) -> list[Dim] | None:
    """Entries computed by arithmetic we do not follow: known in number, unknown in value."""
    if v.shape is not None and len(v.shape) <= 1 and all(isinstance(d, int) for d in v.shape):
        return [Dim() for _ in range(int(np.prod(list(v.shape))) if len(v.shape) else 1)]
    return None


def _unsited(d: Dim) -> Dim:
    return Dim(d.value, d.ref)


def target_of(node: ir.Node, index: int) -> list[Dim] | None:
    """The shape vector an input of ``node`` holds, its constants sited at this node where direct."""
    v = input_or_none(node, index)
    vec = shape_vector(v)
    if vec is not None and const_tensor(v) is not None:
        vec = [Dim(d.value, site=(node, index, j)) for j, d in enumerate(vec)]
    return vec


def write_dim(graph: ir.Graph, dim: Dim, value: int) -> bool:
    """Rewrite a known entry where it is written; False where it cannot be."""
    if dim.site is None:
        return False
    node, index, elem = dim.site
    arr = const_tensor(node.inputs[index]).copy()
    flat = arr.reshape(-1)
    flat[elem] = value
    set_const(graph, node, index, flat.reshape(arr.shape))
    return True


def is_batch_of(dim: Dim, x: ir.Value) -> bool:
    """Whether the entry is the batch size of ``x``: read from x (or a value with x's batch dim), or equal
    to x's static batch."""
    b = x.shape[0] if x.shape is not None and len(x.shape) else None
    if dim.ref is not None:
        v, axis = dim.ref
        if axis != 0 or v.shape is None or not len(v.shape):
            return False
        # Another value's batch is x's where both are one known size or one named symbol; two unknown
        # sizes without a name are not the same size (onnx_ir compares them equal).
        return v is x or (_known_dim(b) and v.shape[0] == b)
    return dim.value is not None and isinstance(b, int) and dim.value == b


def _known_dim(d) -> bool:
    """A size that is an integer or a named symbol."""
    return isinstance(d, int) or (d is not None and getattr(d, "value", None) is not None)


def channel_refs(vec: list[Dim]) -> list[tuple[int, ir.Value]]:
    """(entry, value) for every entry that reads a value's channel count at run time."""
    return [(i, d.ref[0]) for i, d in enumerate(vec)
            if d.ref is not None and channel_axis(d.ref[0]) == d.ref[1]]


def merge_refs(ctx, vec: list[Dim], entry: int | None, ids: list[int] | None, why: str) -> bool:
    """Channel counts read at run time: the one at ``entry`` is merged with ``ids`` (the same channels,
    position by position), every other one is pinned. False when a merge is impossible."""
    ok = True
    for i, v in channel_refs(vec):
        ref_ids = ctx.ids_of(v)
        if ref_ids is None:
            continue
        if i == entry and ids is not None and len(ref_ids) == len(ids):
            for a, b in zip(ref_ids, ids, strict=True):
                ctx.union(a, b)
        else:
            ctx.pin(ref_ids, why)
            ok = ok and i != entry
    return ok


@register("Shape")
class Shape(OpRule):
    """Reads only the shape: it needs no channel. Where the channel count flows anywhere but into a
    Reshape or Expand target, the channels of what it reads are pinned (see the module's docstring)."""

    def out_axes(self, node):
        return [None]

    def couple(self, node, ids, ctx):
        x = node.inputs[0]
        if ids[0] is not None and _count_escapes(node.outputs[0], x):
            ctx.pin(ids[0], f"{label(node)} (the channel count is read as data)")
        return [None]

    def backward(self, node, needed, ins):
        return [np.zeros(len(ins[0]), bool) if ins[0] is not None else None]


def _count_escapes(out: ir.Value, x: ir.Value, _seen: set | None = None) -> bool:
    """Whether x's channel count, read by a Shape into ``out``, reaches anything but a Reshape or Expand
    target or Resize sizes (where their rules take charge of it)."""
    seen = _seen if _seen is not None else set()
    if out in seen:
        return False
    seen.add(out)
    vec = shape_vector(out)
    if vec is not None and not any(d.ref is not None and d.ref[0] is x and d.ref[1] == channel_axis(x) for d in vec):
        return False  # the channel count is not in there
    if out.is_graph_output():
        return True
    for use in out.uses():
        user, index = use.node, use.idx
        if (user.op_type, index) in _TARGETS and user.domain in ("", "ai.onnx"):
            continue
        if user.op_type in _PLUMBING and user.op_type != "Shape" and user.domain in ("", "ai.onnx"):
            if any(_count_escapes(o, x, seen) for o in user.outputs):
                return True
            continue
        return True
    return False


@register("Expand")
class Expand(OpRule):
    """Broadcasting to a shape: a tensor with channels keeps them; one with a single channel is
    spread over the channels the target names."""

    def out_axes(self, node):
        return [follow_axis(node.inputs[0], node.outputs[0])]

    def fill_shapes(self, node):
        x, y = node.inputs[0], node.outputs[0]
        vec = shape_vector(input_or_none(node, 1))
        if x is None or x.shape is None or vec is None:
            return
        if all(d.value is not None for d in vec) and all(isinstance(d, int) for d in x.shape):
            try:
                shape = np.broadcast_shapes(tuple(x.shape), tuple(d.value for d in vec))
            except ValueError:
                return
            if y.shape is None or list(y.shape) != list(shape):
                y.shape = ir.Shape(list(shape))
                if y.type is None:
                    y.type = x.type
            return
        # A target built at run time: each size is the input's where the target says 1, the target's where
        # the input has 1, and a size read off another value is that value's (a named symbol shape inference
        # could not connect, as in repeat_kv's expand(b, kv, n_rep, s, d) of a dynamic batch).
        refine_shape(y, _broadcast_sizes(list(x.shape), vec))

    def _plan(self, node) -> tuple[str, int, list[Dim], int | None] | None:
        """(kind, output axis, target, target entry of the channel axis or None)."""
        x, y = node.inputs[0], node.outputs[0]
        axis, n_in, n_out = channel_axis(y), None, channel_count(y)
        vec = target_of(node, 1)
        if axis is None or vec is None or n_out is None or x is None or x.shape is None:
            return None
        rank = len(y.shape)
        x_axis = axis - (rank - len(x.shape))
        n_in = x.shape[x_axis] if x_axis >= 0 else 1
        entry = axis - (rank - len(vec))
        entry = entry if entry >= 0 else None
        if n_in == n_out and n_out != 1 and channel_axis(x) == x_axis:
            return "keep", axis, vec, entry
        if n_in == 1:
            return "spread", axis, vec, entry
        return None

    def forward(self, node, ins):
        plan = self._plan(node)
        if plan is None:
            return [None]
        if plan[0] == "keep":
            return [ins[0]]
        x = node.inputs[0]
        # One channel broadcast over all: each output channel is what that channel is, where known.
        src = ins[0] if ins[0] is not None and len(ins[0]) == 1 else None
        n = channel_count(node.outputs[0])
        if src is None:
            c = const_tensor(x)
            if c is None or not np.all(c == c.reshape(-1)[0]):
                return [None]
            return [Channels.known(np.full(n, float(c.reshape(-1)[0])))]
        return [Channels(np.repeat(src.state, n), np.repeat(src.value, n))]

    def couple(self, node, ids, ctx):
        plan = self._plan(node)
        why = label(node)
        vec = target_of(node, 1)
        if plan is None:
            if vec is not None:
                merge_refs(ctx, vec, None, None, why)
            return Decline("it broadcasts channels in a way that cannot be followed")
        kind, _axis, vec, entry = plan
        n_out = channel_count(node.outputs[0])
        if kind == "keep":
            if ids[0] is None:
                return Decline("its input's channels cannot be followed")
            d = vec[entry] if entry is not None else None
            if d is not None and d.ref is not None and channel_axis(d.ref[0]) != d.ref[1]:
                merge_refs(ctx, vec, None, None, why)
                return Decline("its target names the channel count by the size of another axis")
            if d is not None and d.ref is None and d.value not in (1, -1) and d.site is None:
                merge_refs(ctx, vec, None, None, why)
                return Decline("its target names the channel count where it cannot be rewritten")
            merge_refs(ctx, vec, entry, ids[0], why)
            return [list(ids[0])]
        d = vec[entry] if entry is not None else None
        if d is not None and d.ref is not None and channel_axis(d.ref[0]) == d.ref[1]:
            ref_ids = ctx.ids_of(d.ref[0])
            if ref_ids is not None and len(ref_ids) == n_out:
                # The spread follows that value's channels: the count read at run time stays right.
                return [list(ref_ids)]
            merge_refs(ctx, vec, None, None, why)
            return Decline("it spreads over a channel count read at run time")
        if d is None or d.site is None:
            merge_refs(ctx, vec, None, None, why)
            return Decline("its channel count cannot be rewritten")
        merge_refs(ctx, vec, None, None, why)
        return [ctx.fresh(n_out)]

    def backward(self, node, needed, ins):
        plan = self._plan(node)
        if plan is not None and plan[0] == "keep":
            return [needed[0], None]
        want = None if needed[0] is None else np.array([bool(needed[0].any())])
        return [want if ins[0] is not None and len(ins[0]) == 1 else None, None]

    def rewrite(self, graph, node, keep_in, keep_out):
        plan = self._plan(node)
        if plan is None or keep_out[0] is None:
            return False
        _, _, vec, entry = plan
        if entry is None:
            return False
        d = vec[entry]
        if d.ref is not None or d.value in (1, -1):
            return False
        return write_dim(graph, d, int(keep_out[0].sum()))


def _broadcast_sizes(xs: list, vec: list[Dim]) -> list | None:
    """Expand's output sizes from the input's and the target's entries, None where a size is not known."""
    if len(vec) < len(xs):
        return None
    xs = [1] * (len(vec) - len(xs)) + xs
    out = []
    for a, d in zip(xs, vec, strict=True):
        t = d.value
        if t is None and d.ref is not None and d.ref[0].shape is not None:
            t = d.ref[0].shape[d.ref[1]]
        if t is None or (isinstance(t, ir.SymbolicDim) and t.value is None):
            out.append(None)
        elif t == 1:
            out.append(a)
        elif a == 1 or a == t:
            out.append(t)
        elif isinstance(a, int):
            if isinstance(t, int):
                return None  # sizes that do not broadcast: left to the runtime to refuse
            out.append(a)  # t is a symbol, and the known size a > 1 is what it must be
        else:
            # An unknown input size is 1 or t: the output's is t where t > 1 is known, unknown beside a
            # symbol that may be 1 at run time.
            out.append(t if isinstance(t, int) else None)
    return out


@register("Tile")
class Tile(OpRule):
    """Repeating a tensor along other axes than the channels' (grouped-query attention's key and value
    heads, tiled for the query heads that share them before a Reshape merges the copies): every copy
    holds the same channels in the same place. Repeats along the channel axis, or repeats not known
    before run time there, make it a wall."""

    def _passes(self, node) -> bool:
        x = node.inputs[0]
        axis = channel_axis(x)
        vec = target_of(node, 1)
        return axis is not None and vec is not None and len(vec) > axis and vec[axis].value == 1

    def out_axes(self, node):
        return [channel_axis(node.inputs[0]) if self._passes(node) else None]

    def forward(self, node, ins):
        return [ins[0] if self._passes(node) else None]

    def couple(self, node, ids, ctx):
        vec = target_of(node, 1)
        if vec is not None:
            merge_refs(ctx, vec, None, None, label(node))
        if not self._passes(node):
            return Decline("it repeats along the channel axis, or by counts known only at run time")
        if ids[0] is None:
            return Decline("its input's channels cannot be followed")
        return [list(ids[0])]

    def backward(self, node, needed, ins):
        return [needed[0], None]
