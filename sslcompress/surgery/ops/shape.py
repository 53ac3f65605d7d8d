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
    CONSTANT,
    ZERO,
    Channels,
    OpRule,
    PassThrough,
    add_initializer,
    attr_value,
    channel_count,
    const_array,
    const_tensor,
    input_or_none,
    rank_of,
    register,
    set_const,
    static_dims,
)


class Spread(OpRule):
    """Output position p is input channel p // spatial (a flatten to (batch, C * spatial))."""

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


def _same_batch(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and a.shape[0] == b.shape[0]


@register("Reshape")
class Reshape(Spread):
    """A Reshape with a constant target that either flattens to (batch, features) or keeps the
    channel axis as it is (reshaping only the spatial dims)."""

    def _kind(self, node) -> str | None:
        x, y = node.inputs[0], node.outputs[0]
        target = const_array(input_or_none(node, 1))
        if target is None or channel_count(x) is None or channel_count(y) is None:
            return None
        features = static_dims(x, 1)
        # (batch, C*H*W): the batch kept as it is (0, or a static size equal to it) or left to -1.
        keeps_batch = _same_batch(x, y) or (target.size == 2 and target[0] == -1 and features is not None
                                            and target[1] == int(np.prod(features)))
        if not keeps_batch:
            return None
        if rank_of(y) == 2 and features is not None and channel_count(y) == int(np.prod(features)):
            return "flatten"
        if channel_count(y) == channel_count(x) and target.size >= 2 and target[1] in (0, -1, channel_count(x)):
            return "keep"
        return None

    def spatial(self, node):
        if self._kind(node) != "flatten":
            return None
        dims = static_dims(node.inputs[0], 2)
        return int(np.prod(dims)) if dims else 1

    def forward(self, node, ins):
        kind = self._kind(node)
        if kind == "keep":
            return [ins[0]]
        return super().forward(node, ins) if kind == "flatten" else [None]

    def couple(self, node, ids, ctx):
        kind = self._kind(node)
        if kind == "keep":
            return [list(ids[0])] if ids[0] is not None else None
        return super().couple(node, ids, ctx) if kind == "flatten" else None

    def backward(self, node, needed, ins):
        if self._kind(node) == "keep":
            return [needed[0], None]
        return super().backward(node, needed, ins)

    def rewrite(self, graph, node, keep_in, keep_out):
        kin, kind = keep_in[0], self._kind(node)  # shapes are still the uncut ones here
        target = const_tensor(node.inputs[1]).copy()
        if kin is None:
            return False
        if kind == "flatten" and target[1] != -1:
            target[1] = int(kin.sum()) * self.spatial(node)
        elif kind == "flatten":
            return False  # (batch, -1) fits any channel count
        elif kind == "keep" and target[1] > 0:
            target[1] = int(kin.sum())
        else:
            return False
        set_const(graph, node, 1, target)
        return True


def _channel_axis_is(node: ir.Node, value: ir.Value, axis: int) -> bool:
    rank = rank_of(value)
    return rank is not None and axis % rank == 1


@register("Concat")
class Concat(OpRule):
    def _ok(self, node) -> bool:
        return _channel_axis_is(node, node.outputs[0], int(attr_value(node, "axis", 0)))

    def forward(self, node, ins):
        if not self._ok(node) or any(c is None for c in ins):
            return [None]
        return [Channels(np.concatenate([c.state for c in ins]), np.concatenate([c.value for c in ins]))]

    def couple(self, node, ids, ctx):
        if not self._ok(node) or any(i is None for i in ids):
            return None
        return [[i for part in ids for i in part]]

    def backward(self, node, needed, ins):
        if needed[0] is None:
            return [None] * len(node.inputs)
        cuts = np.cumsum([len(c) for c in ins])[:-1]
        return list(np.split(needed[0], cuts))


@register("Split")
class Split(OpRule):
    """Consecutive channel ranges; the sizes come from the outputs' shapes."""

    def _sizes(self, node) -> list[int] | None:
        if not _channel_axis_is(node, node.inputs[0], int(attr_value(node, "axis", 0))):
            return None
        sizes = [channel_count(v) for v in node.outputs]
        if any(s is None for s in sizes) or sum(sizes) != channel_count(node.inputs[0]):
            return None
        return sizes

    def forward(self, node, ins):
        sizes = self._sizes(node)
        if sizes is None or ins[0] is None:
            return [None] * len(node.outputs)
        cuts = np.cumsum(sizes)[:-1]
        return [Channels(s, v) for s, v in zip(np.split(ins[0].state, cuts), np.split(ins[0].value, cuts), strict=True)]

    def couple(self, node, ids, ctx):
        sizes = self._sizes(node)
        if sizes is None or ids[0] is None:
            return None
        cuts = np.cumsum([0, *sizes])
        return [list(ids[0][a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

    def backward(self, node, needed, ins):
        sizes = self._sizes(node)
        parts = [n if n is not None else np.ones(s, bool) for n, s in zip(needed, sizes, strict=True)]
        return [np.concatenate(parts)] + [None] * (len(node.inputs) - 1)

    def rewrite(self, graph, node, keep_in, keep_out):
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
        hit = np.nonzero(axes == 1)[0]
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
        hit = np.nonzero(axes == 1)[0]
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
        indices = add_initializer(graph, f"{name}.channel_indices", picked.astype(np.int64))
        gather = ir.Node("", "Gather", [None, indices], attributes=[ir.AttrInt64("axis", 1)],
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
        for a, b, e in zip(axes, begin, end, strict=True):
            if a in (0, 1) and (b or e):
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
    """Spatial resizing with the channel axis left as it is; channel counts in `sizes` follow."""

    def _ok(self, node) -> bool:
        n = channel_count(node.inputs[0])
        y = channel_count(node.outputs[0])
        return n is not None and n == y and _same_batch(node.inputs[0], node.outputs[0])

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
        return super().couple(node, ids, ctx) if self._ok(node) else None

    def rewrite(self, graph, node, keep_in, keep_out):
        sizes = input_or_none(node, 3)
        if sizes is None or const_tensor(sizes) is None or keep_out[0] is None:
            return False
        s = const_tensor(sizes).copy()
        axes = attr_value(node, "axes", None)
        rank = rank_of(node.inputs[0])
        where = [i for i, a in enumerate(axes if axes is not None else range(rank)) if a % rank == 1]
        if not where:
            return False
        s[where[0]] = int(keep_out[0].sum())
        set_const(graph, node, 3, s)
        return True
