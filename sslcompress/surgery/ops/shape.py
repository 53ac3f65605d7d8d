"""Ops that move channels around: Flatten/Reshape to features, Concat, Split, Slice, Pad, Resize.

Flatten (and a Reshape that flattens) spreads channel c over its spatial positions, so a Gemm
or MatMul behind it reads each channel through a block of features; Concat stacks channel ids,
Split and Slice select them. Channel counts written into the graph (split sizes, reshape
targets, resize sizes) follow the kept channels in the rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import (
    AXIS_KEY,
    CONSTANT,
    ZERO,
    Channels,
    Decline,
    OpRule,
    PassThrough,
    add_initializer,
    attr_value,
    channel_axis,
    channel_count,
    const_array,
    const_tensor,
    input_or_none,
    label,
    rank_of,
    refine_shape,
    register,
    set_const,
    static_dims,
)
from .dims import Dim, is_batch_of, merge_refs, shape_vector, target_of, write_dim


class Spread(OpRule):
    """Output position p is input channel p // spatial (a flatten to (batch, C * spatial))."""

    def in_axes(self, node):
        return [1] + [None] * (len(node.inputs) - 1)

    def spatial(self, node) -> int | None:
        raise NotImplementedError

    def forward(self, node, ins):
        s, x = self.spatial(node), ins[0]
        if s is None or x is None:
            return [None]
        return [Channels(np.repeat(x.state, s), np.repeat(x.value, s))]

    def couple(self, node, ids, ctx):
        s = self.spatial(node)
        if s is None or ids[0] is None:
            return None
        return [[i for i in ids[0] for _ in range(s)]]

    def backward(self, node, needed, ins):
        s = self.spatial(node)
        if needed[0] is None:
            return [None] * len(node.inputs)
        return [needed[0].reshape(-1, s).any(1)] + [None] * (len(node.inputs) - 1)


@register("Flatten")
class Flatten(Spread):
    def spatial(self, node):
        dims = static_dims(node.inputs[0], 2)
        rank = rank_of(node.inputs[0])
        if rank is None or int(attr_value(node, "axis", 1)) % rank != 1 or dims is None \
                or channel_count(node.inputs[0]) is None:
            return None
        return int(np.prod(dims)) if dims else 1


@register("Reshape")
class Reshape(Spread):
    """A Reshape that either flattens to (batch, features) or keeps the channel axis as it is
    (reshaping only the spatial dims). The target may be a constant or built at run time from
    the shapes of values (``x.view(x.size(0), -1)``); the decision reads the target's entries and
    the output's static sizes, never the names of symbolic dims."""

    def _plan(self, node) -> tuple[str, list[Dim]] | None:
        if channel_axis(node.inputs[0]) in (None, 1):
            return self._batch_plan(node) or self._rows_plan(node) or self._regroup_plan(node)
        # The batch plans read the channels on axis 1. Tokens of one position each, (B, 1, D) -> (B, D) with the
        # channels on the last axis, also read as a flatten of (batch, 1 x D); the plans that read the channels
        # where they run come first.
        return self._rows_plan(node) or self._regroup_plan(node) or self._batch_plan(node)

    def _regroup_plan(self, node) -> tuple[str, list[Dim]] | None:
        """("regroup", target) for a Reshape that keeps the channel axis and every axis after it as they are and
        regroups the axes before it alone: attention scores (B * W, H, N, N) viewed as (B, W, H, N, N) to add a
        mask per window (Swin) and back. Each element keeps its place along the channels and after them, so
        the channel entry of the target (a constant the rewrite changes, or -1) is all the cut touches."""
        x, y = node.inputs[0], node.outputs[0]
        vec = target_of(node, 1)
        a, rank, n = channel_axis(x), rank_of(x), channel_count(x)
        if vec is None or a is None or rank is None or n is None or y.shape is None or len(vec) != len(y.shape):
            return None
        kept = rank - a  # the channel axis and the axes after it
        c = len(vec) - kept  # where the channel axis lands
        tail = static_dims(x, a)
        if c < 0 or tail is None or static_dims(y, c) != tail:
            return None
        if any(d.ref is not None or (d.value == 0 and not int(attr_value(node, "allowzero", 0)))
               for d in vec[min(a, c):]):
            return None  # a size copied or read at run time where the channels or the axes after them sit
        if vec[c].value not in (n, -1) or any(d.value not in (size, -1) for d, size in zip(vec[c + 1:], tail[1:])):
            return None
        return "regroup", vec

    def _rows_plan(self, node) -> tuple[str, list[Dim]] | None:
        """("rows", target) for a Reshape that regroups the leading axes of a tensor whose channels run
        along its last axis and keeps that axis as it is: tokens flattened into rows for a Gemm
        ((B, S, D) -> (B * S, D)) and back. The target's last entry is the channel count (a constant the
        rewrite changes, or a size read from a channel axis at run time), so in row-major order every
        element keeps its position along the channels whatever the leading entries say."""
        x, y = node.inputs[0], node.outputs[0]
        vec = target_of(node, 1)
        n, rank = channel_count(x), rank_of(x)
        if vec is None or n is None or rank is None or channel_axis(x) != rank - 1 or len(vec) < 2 \
                or (y.shape is not None and len(vec) != len(y.shape)):
            return None
        last = vec[-1]
        if last.ref is not None:
            return ("rows", vec) if channel_axis(last.ref[0]) == last.ref[1] else None
        return ("rows", vec) if last.value == n else None

    def _batch_plan(self, node) -> tuple[str, list[Dim]] | None:
        x, y = node.inputs[0], node.outputs[0]
        vec = target_of(node, 1)
        n = channel_count(x)
        if vec is None or n is None or x.shape is None or len(vec) < 2 or (y.shape is not None and len(vec) != len(y.shape)):
            return None
        if int(attr_value(node, "allowzero", 0)) and any(d.value == 0 for d in vec):
            return None  # a literal size 0, not "copy this dim"
        first, second = vec[0], vec[1]
        features = static_dims(x, 1)
        n_features = int(np.prod(features)) if features is not None else None
        keeps_batch = first.value == 0 or is_batch_of(first, x) or (
            first.value == -1 and second.value is not None and second.value == n_features)
        if not keeps_batch:
            return None
        # (batch, C*H*W): read from the target, whatever shape inference made of the output.
        if len(vec) == 2 and n_features is not None and (second.value == -1 or (
                second.value == n_features and second.ref is None)):
            return "flatten", vec
        if y.shape is None or channel_count(y) != n:
            return None
        if second.ref is not None:
            # A size read at run time names the channels: only a channel count will do (couple merges
            # that value's channels with x's), never the size of some other axis.
            return ("keep", vec) if channel_axis(second.ref[0]) == second.ref[1] else None
        if second.value in (0, n, -1):
            return "keep", vec
        return None

    def _kind(self, node) -> str | None:
        plan = self._plan(node)
        return None if plan is None else plan[0]

    def in_axes(self, node):
        kind = self._kind(node)
        if kind == "rows":
            return [rank_of(node.inputs[0]) - 1, None]
        if kind == "regroup":
            return [channel_axis(node.inputs[0]), None]
        return super().in_axes(node)

    def out_axes(self, node):
        plan = self._plan(node)
        if plan is not None and plan[0] == "rows":
            return [len(plan[1]) - 1]
        if plan is not None and plan[0] == "regroup":
            return [self._regroup_entry(node, plan[1])]
        return super().out_axes(node)

    @staticmethod
    def _regroup_entry(node, vec: list[Dim]) -> int:
        x = node.inputs[0]
        return len(vec) - (rank_of(x) - channel_axis(x))

    def fill_shapes(self, node):
        x, y = node.inputs[0], node.outputs[0]
        self._target_shape(node)
        known = y.shape is not None and len(y.shape) == 2 and isinstance(y.shape[1], int)
        if not known and self._kind(node) == "flatten":
            batch = y.shape[0] if y.shape is not None and len(y.shape) == 2 else x.shape[0]
            y.shape = ir.Shape([batch, int(np.prod(static_dims(x, 1)))])
            if y.type is None:
                y.type = x.type

    def _target_shape(self, node) -> None:
        """The output's sizes as the target names them: a known entry, x's own size for a copied 0, the
        size (or symbol) of the axis a Shape reads at run time. Inference leaves the output of a target
        read from the Shape of a value with symbolic sizes unknown; the plan reads it from here."""
        x, y = node.inputs[0], node.outputs[0]
        vec = shape_vector(input_or_none(node, 1))
        if vec is None or x is None or x.shape is None or y is None or (y.shape is not None and len(y.shape) != len(vec)):
            return
        allowzero = int(attr_value(node, "allowzero", 0))
        dims: list = []
        for i, d in enumerate(vec):
            if d.value == 0 and not allowzero:
                dims.append(x.shape[i] if i < len(x.shape) else None)
            elif d.ref is not None and d.ref[0].shape is not None and d.ref[1] < len(d.ref[0].shape):
                dims.append(d.ref[0].shape[d.ref[1]])
            elif d.value is not None and d.value >= 0:
                dims.append(d.value)
            else:
                dims.append(None)
        if dims.count(None) == 1 and vec[dims.index(None)].value == -1:
            dims[dims.index(None)] = _inferred(list(x.shape), [d for d in dims if d is not None])
        refine_shape(y, dims)
        if y.type is None:
            y.type = x.type

    def spatial(self, node):
        if self._kind(node) != "flatten":
            return None
        dims = static_dims(node.inputs[0], 2)
        return int(np.prod(dims)) if dims else 1

    def forward(self, node, ins):
        kind = self._kind(node)
        if kind in ("keep", "rows", "regroup"):
            return [ins[0]]
        return super().forward(node, ins) if kind == "flatten" else [None]

    def couple(self, node, ids, ctx):
        plan = self._plan(node)
        vec = target_of(node, 1)
        why = label(node)
        if plan is None or ids[0] is None:
            if vec is not None:
                merge_refs(ctx, vec, None, None, why)
            return Decline("it neither flattens (batch, features) nor keeps the channel axis")
        kind, vec = plan
        entry = {"keep": 1, "rows": len(vec) - 1, "regroup": self._regroup_entry(node, vec)}.get(kind)
        fixed = vec[entry if kind in ("rows", "regroup") else 1]
        if fixed.ref is None and fixed.value not in (0, -1) and fixed.site is None:
            merge_refs(ctx, vec, None, None, why)
            return Decline("its target names the channel count where it cannot be rewritten")
        merge_refs(ctx, vec, entry, ids[0], why)
        if kind in ("keep", "rows", "regroup"):
            return [list(ids[0])]
        return super().couple(node, ids, ctx)

    def backward(self, node, needed, ins):
        if self._kind(node) in ("keep", "rows", "regroup"):
            return [needed[0], None]
        return super().backward(node, needed, ins)

    def rewrite(self, graph, node, keep_in, keep_out):
        kin, plan = keep_in[0], self._plan(node)  # shapes are still the uncut ones here
        if kin is None or plan is None:
            return False
        kind, vec = plan
        if kind == "rows":
            d = vec[-1]
        elif kind == "regroup":
            d = vec[self._regroup_entry(node, vec)]
        else:
            d = vec[1]
        if d.ref is not None or d.value in (0, -1):
            return False  # read at run time, or inferred: fits any channel count
        count = int(kin.sum()) * (self.spatial(node) if kind == "flatten" else 1)
        return write_dim(graph, d, count)


def _inferred(sizes: list, named: list) -> int | None:
    """The size a -1 entry takes: x's sizes over the target's others, equal factors (the same integer,
    the same named symbol) cancelled first, so a symbolic batch on both sides divides out."""
    rest = list(sizes)
    left = []
    for d in named:
        same = [j for j, e in enumerate(rest) if (isinstance(d, int) and isinstance(e, int) and d == e)
                or (not isinstance(d, int) and not isinstance(e, int) and getattr(d, "value", None) is not None
                    and d == e)]
        if same:
            del rest[same[0]]
        else:
            left.append(d)
    if not all(isinstance(d, int) for d in rest + left):
        return None
    num, den = int(np.prod(rest)), int(np.prod(left))
    return num // den if den and num % den == 0 else None


def _channel_axis_is(node: ir.Node, value: ir.Value, axis: int) -> bool:
    rank, ch = rank_of(value), channel_axis(value)
    return rank is not None and ch is not None and axis % rank == ch


@register("Concat")
class Concat(OpRule):
    """Channel ranges stacked along their own axis; or, along another axis, parts that each hold all the
    channels (a rotary embedding's rotated halves of each head's features, concatenated again): channel c of
    every part is channel c of the output, as in Split's counterpart."""

    def out_axes(self, node):
        return [channel_axis(node.inputs[0]) if node.inputs else 1]

    def _ok(self, node) -> bool:
        axis = int(attr_value(node, "axis", 0))
        return all(v is not None and _channel_axis_is(node, v, axis) for v in [*node.inputs, node.outputs[0]])

    def _across(self, node) -> bool:
        """Whether it stacks along an axis other than the channels', every part holding all of them."""
        y, rank = node.outputs[0], rank_of(node.outputs[0])
        ch, n = channel_axis(y), channel_count(y)
        if rank is None or ch is None or n is None or not node.inputs:
            return False
        axis = int(attr_value(node, "axis", 0)) % rank
        return axis != ch and all(v is not None and rank_of(v) == rank and channel_axis(v) == ch
                                  and channel_count(v) == n for v in node.inputs)

    def forward(self, node, ins):
        if self._across(node):
            if any(c is None for c in ins):
                return [None]
            # A channel is known where every part holds it at one value.
            same = np.logical_and.reduce([c.is_known & (c.known_values == ins[0].known_values) for c in ins])
            return [Channels.known(np.where(same, ins[0].known_values, 0.0)).with_live(~same)]
        if not self._ok(node) or any(c is None for c in ins):
            return [None]
        return [Channels(np.concatenate([c.state for c in ins]), np.concatenate([c.value for c in ins]))]

    def couple(self, node, ids, ctx):
        if self._across(node) and all(i is not None for i in ids):
            for part in ids[1:]:
                for a, b in zip(ids[0], part, strict=True):
                    ctx.union(a, b)
            return [list(ids[0])]
        if not self._ok(node) or any(i is None for i in ids):
            return Decline("it does not stack followed channels along their own axis")
        return [[i for part in ids for i in part]]

    def backward(self, node, needed, ins):
        if self._across(node):
            return [needed[0]] * len(node.inputs)
        if needed[0] is None:
            return [None] * len(node.inputs)
        cuts = np.cumsum([len(c) for c in ins])[:-1]
        return list(np.split(needed[0], cuts))


@register("Split")
class Split(OpRule):
    """Consecutive channel ranges; the sizes come from the outputs' shapes. Along another axis (q, k
    and v out of a packed tensor) every output has all the channels."""

    def out_axes(self, node):
        return [channel_axis(node.inputs[0])] * len(node.outputs)

    def _across(self, node) -> bool:
        """Whether it splits along an axis other than the channels' (and not the batch's)."""
        x, rank = node.inputs[0], rank_of(node.inputs[0])
        ch = channel_axis(x)
        if rank is None or ch is None:
            return False
        axis = int(attr_value(node, "axis", 0)) % rank
        return axis != ch and all(channel_count(v) == channel_count(x) for v in node.outputs)

    def _sizes(self, node) -> list[int] | None:
        if not _channel_axis_is(node, node.inputs[0], int(attr_value(node, "axis", 0))):
            return None
        sizes = [channel_count(v) for v in node.outputs]
        if any(s is None for s in sizes) or sum(sizes) != channel_count(node.inputs[0]):
            return None
        return sizes

    def forward(self, node, ins):
        if self._across(node):
            return [ins[0]] * len(node.outputs)
        sizes = self._sizes(node)
        if sizes is None or ins[0] is None:
            return [None] * len(node.outputs)
        cuts = np.cumsum(sizes)[:-1]
        return [Channels(s, v) for s, v in zip(np.split(ins[0].state, cuts), np.split(ins[0].value, cuts), strict=True)]

    def couple(self, node, ids, ctx):
        if self._across(node):
            return None if ids[0] is None else [list(ids[0]) for _ in node.outputs]
        sizes = self._sizes(node)
        if sizes is None or ids[0] is None:
            return None
        cuts = np.cumsum([0, *sizes])
        return [list(ids[0][a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

    def backward(self, node, needed, ins):
        if self._across(node):
            if ins[0] is None:
                return [None] * len(node.inputs)
            want = np.zeros(len(ins[0]), bool)
            for n in needed:
                want |= np.ones(len(ins[0]), bool) if n is None else n
            return [want] + [None] * (len(node.inputs) - 1)
        sizes = self._sizes(node)
        parts = [n if n is not None else np.ones(s, bool) for n, s in zip(needed, sizes, strict=True)]
        return [np.concatenate(parts)] + [None] * (len(node.inputs) - 1)

    def rewrite(self, graph, node, keep_in, keep_out):
        if self._across(node):
            return False  # its sizes run along another axis
        sizes = np.array([int(k.sum()) if k is not None else s
                          for k, s in zip(keep_out, self._sizes(node), strict=True)], np.int64)
        if "num_outputs" in node.attributes:
            del node.attributes["num_outputs"]
        if "split" in node.attributes:
            node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())
        elif input_or_none(node, 1) is not None:
            set_const(graph, node, 1, sizes)
        elif _opset(graph) < 13:
            node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())
        else:
            node.resize_inputs(2)
            node.replace_input_with(1, add_initializer(graph, f"{node.name or 'split'}.sizes", sizes))
        return True


def _opset(graph: ir.Graph) -> int:
    return int(graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 1)))


@register("Slice")
class Slice(OpRule):
    """A Slice with constant starts/ends/axes/steps: along the channel axis it selects channels,
    along other axes it crops every channel alike."""

    def out_axes(self, node):
        return [channel_axis(node.inputs[0])]

    def _params(self, node) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        # In their own int64: INT64_MAX, the usual open end, does not survive a float64 round trip.
        arrays = [const_tensor(input_or_none(node, i)) for i in range(1, 5)]
        if len(node.inputs) < 3 or arrays[0] is None or arrays[1] is None:
            return None
        rank = rank_of(node.inputs[0])
        if rank is None or any(input_or_none(node, i) is not None and arrays[i - 1] is None for i in (3, 4)):
            return None
        starts, ends = arrays[0].astype(np.int64), arrays[1].astype(np.int64)
        axes = arrays[2].astype(np.int64) % rank if arrays[2] is not None else np.arange(len(starts))
        steps = arrays[3].astype(np.int64) if arrays[3] is not None else np.ones(len(starts), np.int64)
        return starts, ends, axes, steps

    def _selected(self, node) -> np.ndarray | None:
        """Input channels the output holds, in order; None when this Slice cannot be read."""
        p = self._params(node)
        n = channel_count(node.inputs[0])
        if p is None or n is None:
            return None
        starts, ends, axes, steps = p
        hit = np.nonzero(axes == channel_axis(node.inputs[0]))[0]
        if not len(hit):
            return np.arange(n)
        i = hit[0]
        return np.array(range(n)[slice(int(starts[i]), int(ends[i]), int(steps[i]))], np.int64)

    def forward(self, node, ins):
        sel = self._selected(node)
        if sel is None or ins[0] is None:
            return [None]
        return [ins[0].take(sel)]

    def couple(self, node, ids, ctx):
        sel = self._selected(node)
        if sel is None or ids[0] is None or len(sel) != channel_count(node.outputs[0]):
            return None
        return [[ids[0][i] for i in sel]]

    def backward(self, node, needed, ins):
        sel = self._selected(node)
        need = np.zeros(len(ins[0]), bool)
        need[sel] = True if needed[0] is None else needed[0]
        return [need] + [None] * (len(node.inputs) - 1)

    def rewrite(self, graph, node, keep_in, keep_out):
        kin = keep_in[0]
        if kin is None or kin.all():
            return False
        sel = self._selected(node)
        new_index = np.cumsum(kin) - 1
        picked = new_index[sel[kin[sel]]]
        starts, ends, axes, steps = self._params(node)
        hit = np.nonzero(axes == channel_axis(node.inputs[0]))[0]
        if not len(hit):
            return False
        i = hit[0]
        step = int(picked[1] - picked[0]) if len(picked) > 1 else 1
        if step > 0 and np.all(np.diff(picked) == step):
            starts, ends, steps = starts.copy(), ends.copy(), steps.copy()
            starts[i], ends[i], steps[i] = picked[0], picked[-1] + 1, step
            self._set(graph, node, starts, ends, axes, steps)
            return True
        # Not a regular stride any more: take every channel here and let a Gather pick them.
        starts, ends, steps = starts.copy(), ends.copy(), steps.copy()
        starts[i], ends[i], steps[i] = 0, int(kin.sum()), 1
        self._set(graph, node, starts, ends, axes, steps)
        out = node.outputs[0]
        name = out.name
        gathered = ir.Value(name=f"{name}.channels", shape=out.shape, type=out.type)
        # The rules that rewrite its readers later in this pass read where its channels run.
        gathered.meta[AXIS_KEY] = out.meta.get(AXIS_KEY)
        indices = add_initializer(graph, f"{name}.channel_indices", picked.astype(np.int64))
        gather = ir.Node("", "Gather", [None, indices], attributes=[ir.AttrInt64("axis", channel_axis(out))],
                         outputs=[gathered], name=f"{name}.gather")
        out.replace_all_uses_with(gathered, replace_graph_outputs=True)
        gather.replace_input_with(0, out)
        graph.insert_after(node, gather)
        out.name, gathered.name = f"{name}.all_channels", name  # readers (and outputs) keep the name
        return True

    def _set(self, graph, node, starts, ends, axes, steps) -> None:
        set_const(graph, node, 1, starts)
        set_const(graph, node, 2, ends)
        if input_or_none(node, 4) is not None:
            set_const(graph, node, 4, steps)


@register("Pad")
class Pad(PassThrough):
    """Padding of the spatial axes only. Constant padding with v keeps a channel known only where
    it holds v already; reflect and edge padding keep every constant channel constant."""

    def _spatial_only(self, node) -> tuple[bool, bool] | None:
        """(is this Pad readable with no padding on the channel axis, does it pad at all)."""
        rank = rank_of(node.inputs[0])
        pads = const_array(input_or_none(node, 1))
        if pads is None:
            pads_attr = attr_value(node, "pads", None)
            pads = None if pads_attr is None else np.array(pads_attr, np.float64)
        if rank is None or pads is None:
            return None
        axes = const_array(input_or_none(node, 3))
        axes = np.arange(rank) if axes is None else axes.astype(np.int64) % rank
        half = len(pads) // 2
        begin, end = pads[:half], pads[half:]
        if len(axes) != half:
            return None
        for a, b, e in zip(axes, begin, end, strict=True):
            if a in (0, channel_axis(node.inputs[0])) and (b or e):
                return None
        return True, bool(np.any(pads))

    def forward(self, node, ins):
        x = ins[0]
        info = self._spatial_only(node)
        if x is None or info is None:
            return [None]
        if not info[1] or attr_value(node, "mode", "constant") != "constant":
            return [x]
        fill = const_array(input_or_none(node, 2))
        if input_or_none(node, 2) is not None and fill is None:
            return [None]
        if fill is not None and fill.size:
            v = float(fill.reshape(-1)[0])
        else:
            v = float(attr_value(node, "value", 0.0))  # before opset 11 the fill is an attribute
        keep = ((x.state == ZERO) & (v == 0)) | ((x.state == CONSTANT) & (x.value == v))
        return [x.with_live(~keep)]

    def couple(self, node, ids, ctx):
        return super().couple(node, ids, ctx) if self._spatial_only(node) is not None else None


@register("Resize", "Upsample")
class Resize(PassThrough):
    """Spatial resizing with the batch and channel axes left as they are, read from the scales or
    sizes themselves (a symbolic batch is compared by value, not by name); a channel count in
    ``sizes`` follows the kept channels."""

    def _per_axis(self, node) -> dict[int, tuple[str, object]] | None:
        x = node.inputs[0]
        rank = rank_of(x)
        if rank is None:
            return None
        axes = attr_value(node, "axes", None)
        axes = [int(a) % rank for a in axes] if axes is not None else list(range(rank))
        if node.op_type == "Upsample" and input_or_none(node, 1) is None:
            scales = attr_value(node, "scales", None)
            scales = None if scales is None else np.asarray(list(scales), np.float64)
        else:
            k = 1 if node.op_type == "Upsample" or len(node.inputs) == 2 else 2
            v = input_or_none(node, k)
            scales = const_array(v) if v is not None else None
            if v is not None and scales is None:
                return None  # scales computed at run time
        if scales is not None and scales.size:
            return {a: ("scale", float(f)) for a, f in zip(axes, scales.reshape(-1), strict=False)}
        sizes = target_of(node, 3) if len(node.inputs) > 3 else None
        if sizes is None:
            return None
        return {a: ("size", d) for a, d in zip(axes, sizes, strict=False)}

    def _ok(self, node) -> bool:
        x = node.inputs[0]
        n, ax = channel_count(x), channel_axis(x)
        per = self._per_axis(node)
        if n is None or per is None:
            return False
        for a in (0, ax):
            kind, val = per.get(a, ("scale", 1.0))
            if kind == "scale" and val != 1.0:
                return False
            if kind == "size" and a == 0 and not is_batch_of(val, x):
                return False
            if kind == "size" and a == ax and not (val.ref == (x, ax) or (val.value == n and val.site is not None)):
                return False
        return True

    def forward(self, node, ins):
        x = ins[0]
        if x is None or not self._ok(node):
            return [None]
        mode = attr_value(node, "mode", "nearest")
        extrapolates = attr_value(node, "coordinate_transformation_mode", "") == "tf_crop_and_resize"
        if extrapolates and float(attr_value(node, "extrapolation_value", 0.0)) != 0:
            return [x.with_live(np.ones(len(x), bool))]
        if mode == "nearest" and not extrapolates:
            return [x]
        return [x.with_live(x.state == CONSTANT)]  # interpolated zeros stay zero; constants round

    def couple(self, node, ids, ctx):
        per = self._per_axis(node)
        sizes = [d for kind, d in per.values() if kind == "size"] if per is not None else []
        ax = channel_axis(node.inputs[0])
        if not self._ok(node):
            merge_refs(ctx, sizes, None, None, label(node))
            return Decline("it resizes the batch or channel axis, or its sizes cannot be read")
        # Sizes read at run time: the channel entry is this input's own count; any other is pinned.
        others = [d for a, (kind, d) in per.items() if kind == "size" and a != ax]
        merge_refs(ctx, others, None, None, label(node))
        return super().couple(node, ids, ctx)

    def rewrite(self, graph, node, keep_in, keep_out):
        per = self._per_axis(node)
        ax = channel_axis(node.inputs[0])
        if per is None or keep_out[0] is None or per.get(ax, ("scale",))[0] != "size":
            return False
        d = per[ax][1]
        return d.ref is None and write_dim(graph, d, int(keep_out[0].sum()))
