"""Fused attention ops: ONNX ``Attention`` (opset 23) and ORT's ``com.microsoft`` ``Attention`` and
``MultiHeadAttention``.

Each computes softmax(Q K^T * scale) V head by head, so a head is a block of Dh channels of q, k, v
and the output (heads on the last axis of 3-D inputs), or one position of the heads axis (4-D
inputs). A head goes whole: its q, k and v channels and its output channels are one id. Output
channel c is the softmax-weighted sum of v channel c over the keys, so it is what v channel c is
where that is known (the weights sum to 1). The head count written in the node (``num_heads``,
``q_num_heads``, ``kv_num_heads``) and packed weights and biases follow the heads kept; the default
scale, 1/sqrt(Dh), does not change.

ONNX Attention may group its query heads over fewer key/value heads (``kv_num_heads``, or k and v
with fewer heads on axis 1): query head h reads key/value head h // R, R = q_num_heads / kv_num_heads,
so a key/value head and its R query heads are one id, and both head counts follow the groups kept.

Walls, each with its reason: a past key/value cache or a present one that is read, a mask or bias
per head, rotary embeddings, the q/k/v sizes of contrib Attention differing, or anything the rule
cannot read.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import (
    Channels,
    Decline,
    OpRule,
    attr_value,
    channel_axis,
    channel_count,
    const_array,
    input_or_none,
    rank_of,
    refine_shape,
    register,
    take_const,
)


def _read_outputs(node, first: int = 1) -> bool:
    return any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[first:])


def _present(node, indices) -> list[int]:
    return [i for i in indices if input_or_none(node, i) is not None]


def _union_heads(ctx, parts: list[list[int]], heads: int) -> None:
    """Merge the ids of each head across the parts (channels h * Dh ... (h + 1) * Dh - 1 of each)."""
    for h in range(heads):
        ids = [int(i) for p in parts for i in np.array_split(np.array(p), heads)[h]]
        for i in ids[1:]:
            ctx.union(ids[0], i)


def _heads_kept(keep: np.ndarray | None, heads: int) -> np.ndarray | None:
    if keep is None:
        return None
    per = keep.reshape(heads, -1)
    if not np.all(per.all(1) | ~per.any(1)):
        raise AssertionError("a head would lose only some of its channels")
    return per.all(1)


def _set_int(node, name: str, value: int) -> None:
    node.attributes[name] = ir.AttrInt64(name, int(value))


class PackedProjectionAttention(OpRule):
    """com.microsoft Attention: input (B, S, D_in) @ weights (D_in, 3 * D) + bias, split into q, k, v."""

    def fill_shapes(self, node):
        """ONNX shape inference does not know contrib ops: the output is (B, S, D)."""
        x, w, y = node.inputs[0], const_array(input_or_none(node, 1)), node.outputs[0]
        if x is not None and x.shape is not None and len(x.shape) == 3 and w is not None and w.ndim == 2:
            refine_shape(y, [x.shape[0], x.shape[1], w.shape[1] // 3])
            if y.type is None:
                y.type = x.type

    def out_axes(self, node):
        rank = rank_of(node.outputs[0])
        return [None if rank is None else rank - 1] + [None] * (len(node.outputs) - 1)

    def _plan(self, node) -> tuple[int, int] | Decline:
        """(heads, Dh), or why not."""
        heads = int(attr_value(node, "num_heads", 0))
        w = const_array(input_or_none(node, 1))
        b_value = input_or_none(node, 2)
        b = const_array(b_value)
        if w is None or w.ndim != 2 or (b_value is not None and b is None):
            return Decline("its weights or bias are computed at run time")
        sizes = attr_value(node, "qkv_hidden_sizes", None)
        if sizes is not None and len(set(int(s) for s in sizes)) != 1:
            return Decline("its q, k and v sizes differ (qkv_hidden_sizes)")
        if int(attr_value(node, "do_rotary", 0)):
            return Decline("it applies rotary embeddings")
        if _present(node, range(4, len(node.inputs))) or _read_outputs(node):
            return Decline("it reads a past key/value cache, an attention bias, or its present cache is read")
        mask = input_or_none(node, 3)
        if mask is not None and rank_of(mask) == 4:
            return Decline("its mask holds one slice per head")
        hidden = w.shape[1] // 3
        if heads < 1 or w.shape[1] % 3 or hidden % heads or channel_count(node.outputs[0]) != hidden:
            return Decline("its weights do not split into num_heads heads of q, k and v")
        return heads, hidden // heads

    def forward(self, node, ins):
        plan = self._plan(node)
        if isinstance(plan, Decline):
            return [None] * len(node.outputs)
        w = const_array(node.inputs[1])
        hidden = w.shape[1] // 3
        b = const_array(input_or_none(node, 2))
        bias_v = np.zeros(hidden) if b is None else b.reshape(-1)[2 * hidden:]
        v_live = np.abs(w[:, 2 * hidden:]).sum(0) > 0  # a value feature with a zero column is its bias
        return [Channels.known(bias_v).with_live(v_live)] + [None] * (len(node.outputs) - 1)

    def couple(self, node, ids, ctx):
        plan = self._plan(node)
        if isinstance(plan, Decline):
            return plan
        heads, dh = plan
        out = ctx.fresh(heads * dh)
        _union_heads(ctx, [out], heads)
        return [out] + [None] * (len(node.outputs) - 1)

    def rewrite(self, graph, node, keep_in, keep_out):
        heads, dh = self._plan(node)
        kept = _heads_kept(keep_out[0], heads)
        if kept is None or kept.all():
            return False
        cols = np.tile(np.repeat(kept, dh), 3)
        take_const(graph, node, 1, lambda a: a[:, cols])
        if input_or_none(node, 2) is not None:
            take_const(graph, node, 2, lambda a: a[cols])
        _set_int(node, "num_heads", int(kept.sum()))
        if "qkv_hidden_sizes" in node.attributes:
            node.attributes["qkv_hidden_sizes"] = ir.AttrInt64s("qkv_hidden_sizes", [int(kept.sum()) * dh] * 3)
        return True


class SeparateInputsAttention(OpRule):
    """q, k and v given apart: com.microsoft MultiHeadAttention and ONNX Attention (opset 23).

    3-D inputs (B, S, H * Dh) carry heads as blocks of the last axis; 4-D (B, H, S, Dh) on axis 1."""

    head_attrs: tuple[str, ...] = ()
    cache_inputs: tuple[int, ...] = ()
    bias_input: int | None = None

    def fill_shapes(self, node):
        """The output has the query's shape with the value's width (contrib ops are unknown to inference)."""
        q, v, y = input_or_none(node, 0), input_or_none(node, 2), node.outputs[0]
        if q is not None and v is not None and q.shape is not None and v.shape is not None \
                and len(q.shape) == len(v.shape) == 3:
            refine_shape(y, [q.shape[0], q.shape[1], v.shape[2]])
            if y.type is None:
                y.type = q.type

    def _layout(self, node) -> tuple[int, int, int, int] | Decline:
        """(axis, query heads, key/value heads, Dh): q and the output hold query heads x Dh channels, k and
        v key/value heads x Dh (the same where the heads are not grouped); or why not."""
        q, k, v = (input_or_none(node, i) for i in range(3))
        if q is None or k is None or v is None:
            return Decline("its key or value is packed with the query")
        ranks = {rank_of(x) for x in (q, k, v, node.outputs[0])}
        if len(ranks) != 1 or None in ranks:
            return Decline("its q, k, v and output are not of one rank")
        rank = ranks.pop()
        if _present(node, self.cache_inputs) or _read_outputs(node):
            return Decline("it reads a past key/value cache, or an output other than its result is read")
        axis = rank - 1 if rank == 3 else 1
        if rank not in (3, 4) or any(channel_axis(x) != axis for x in (q, k, v)):
            return Decline("its heads do not run on the axis its inputs carry channels on")
        nq, nk, nv, no = (channel_count(x) for x in (q, k, v, node.outputs[0]))
        if None in (nq, nk, nv, no) or nq != no or nk != nv:
            return Decline("its q, k, v and output widths differ")
        if rank == 4:
            h, hkv, dh = nq, nk, 1
        else:
            heads = [int(attr_value(node, a, 0)) for a in self.head_attrs]
            h = heads[0] if heads else 0
            hkv = heads[-1] if heads else 0
            if h < 1 or hkv < 1 or nq % h or nk != hkv * (nq // h):
                return Decline("its width does not split into its heads")
            dh = nq // h
        if h % hkv:
            return Decline("its query heads do not fall into equal groups over its key/value heads")
        if hkv != h and self._bias(node) is not None:
            return Decline("it groups query heads over fewer key/value heads and adds a packed bias")
        return axis, h, hkv, dh

    @staticmethod
    def _kv_of_each_output(h: int, hkv: int, dh: int) -> np.ndarray:
        """For each output (query) channel, the key/value channel its head reads."""
        return np.array([(head // (h // hkv)) * dh + d for head in range(h) for d in range(dh)])

    def in_axes(self, node):
        plan = self._layout(node)
        if isinstance(plan, Decline):
            return [None] * len(node.inputs)
        return [plan[0]] * 3 + [None] * (len(node.inputs) - 3)

    def out_axes(self, node):
        rank = rank_of(node.outputs[0])
        axis = None if rank is None else (rank - 1 if rank == 3 else 1)
        return [axis] + [None] * (len(node.outputs) - 1)

    def _bias(self, node) -> np.ndarray | None | Decline:
        """The packed (q, k, v) bias, None where there is none."""
        if self.bias_input is None or input_or_none(node, self.bias_input) is None:
            return None
        b = const_array(node.inputs[self.bias_input])
        return Decline("its bias is computed at run time") if b is None else b.reshape(-1)

    def _mask_decline(self, node) -> Decline | None:
        return None

    def forward(self, node, ins):
        plan = self._layout(node)
        if isinstance(plan, Decline) or isinstance(self._bias(node), Decline) or ins[2] is None:
            return [None] * len(node.outputs)
        v = ins[2]
        b = self._bias(node)
        if b is not None:
            v = Channels.known(v.known_values + b[2 * len(v):]).with_live(~v.is_known)
        _, h, hkv, dh = plan
        if hkv != h:  # each query head's output is what its key/value head's values are, where known
            picked = self._kv_of_each_output(h, hkv, dh)
            v = Channels(v.state[picked], v.value[picked])
        return [v] + [None] * (len(node.outputs) - 1)

    def couple(self, node, ids, ctx):
        plan = self._layout(node)
        if isinstance(plan, Decline):
            return plan
        for why in (self._bias(node), self._mask_decline(node)):
            if isinstance(why, Decline):
                return why
        if any(i is None for i in ids[:3]):
            return Decline("the channels of its q, k or v cannot be followed")
        _, heads, hkv, dh = plan
        # Each query head with the key/value head it reads: k and v spread over the query heads first.
        picked = self._kv_of_each_output(heads, hkv, dh)
        k, v = ([list(ids[i])[j] for j in picked] for i in (1, 2))
        _union_heads(ctx, [ids[0], k, v], heads)
        return [v] + [None] * (len(node.outputs) - 1)

    def backward(self, node, needed, ins):
        want = needed[0]
        plan = self._layout(node)
        if want is None or isinstance(plan, Decline) or plan[1] == plan[2]:
            return [want, want, want] + [None] * (len(node.inputs) - 3)
        _, h, hkv, dh = plan
        shared = want.reshape(hkv, h // hkv, dh).any(1).reshape(-1)  # a key/value head serves its group
        return [want, shared, shared] + [None] * (len(node.inputs) - 3)

    def rewrite(self, graph, node, keep_in, keep_out):
        plan = self._layout(node)
        _, heads, hkv, dh = plan
        kept = _heads_kept(keep_out[0], heads)
        if kept is None or kept.all():
            return False
        if rank_of(node.outputs[0]) == 3:  # 4-D inputs carry their head counts in their shapes
            groups = int(kept.reshape(hkv, heads // hkv).all(1).sum())
            for a in self.head_attrs:
                _set_int(node, a, groups if a == "kv_num_heads" else int(kept.sum()))
        if self._bias(node) is not None:
            cols = np.tile(np.repeat(kept, dh), 3)
            take_const(graph, node, self.bias_input, lambda a: a[cols])
        return True


class MultiHeadAttention(SeparateInputsAttention):
    head_attrs = ("num_heads",)
    cache_inputs = (5, 6, 7, 8, 9)  # attention_bias, past key/value, past_sequence_length, cache_indirection
    bias_input = 3

    def _mask_decline(self, node):
        mask = input_or_none(node, 4)
        if mask is not None and rank_of(mask) not in (1, 2):
            return Decline("its key padding mask is not one per batch or per key")
        return None


class OnnxAttention(SeparateInputsAttention):
    head_attrs = ("q_num_heads", "kv_num_heads")
    cache_inputs = (4, 5, 6)  # past_key, past_value, nonpad_kv_seqlen

    def _mask_decline(self, node):
        mask = input_or_none(node, 3)
        if mask is not None and (mask.shape is None or len(mask.shape) == 4 and mask.shape[1] != 1):
            return Decline("its mask holds one slice per head")
        return None


register("Attention", domain="com.microsoft")(PackedProjectionAttention)
register("MultiHeadAttention", domain="com.microsoft")(MultiHeadAttention)
register("Attention", opsets=(23, None))(OnnxAttention)
