"""Layers with weights: Conv (grouped and depthwise too), ConvTranspose, Gemm, MatMul, BatchNorm.

A weighted layer writes new channels (fresh ids) and reads an input channel only through a
nonzero weight fibre; a zero input channel contributes nothing, zero padding included, so
deleting it with its fibre is exact. A grouped Conv keeps equal groups: each group's input and
output channels share one id, so a group goes as a whole (for a depthwise Conv: a channel and
its outputs).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import (
    CONSTANT,
    LIVE,
    ZERO,
    Channels,
    Decline,
    OpRule,
    PassThrough,
    attr_value,
    channel_count,
    const_array,
    const_tensor,
    input_or_none,
    rank_of,
    register,
    set_const,
)


def conv_is_padded(node) -> bool:
    pads = attr_value(node, "pads", None)
    return bool(pads and any(pads)) or attr_value(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID")


def _bias(node, n: int) -> np.ndarray | None:
    b = input_or_none(node, 2)
    if b is None:
        return np.zeros(n)
    c = const_array(b)
    return None if c is None else np.broadcast_to(c.reshape(-1), (n,)).astype(np.float64)


def _needed_or_all(needed, n: int) -> np.ndarray:
    return np.ones(n, bool) if needed is None else needed


@register("Conv")
class Conv(OpRule):
    def forward(self, node, ins):
        x = ins[0]
        w = const_array(input_or_none(node, 1))
        if x is None or w is None:
            return [None]
        b = _bias(node, w.shape[0])
        if b is None:
            return [None]
        group = int(attr_value(node, "group", 1))
        padded = conv_is_padded(node)
        out_ch, per_group_in = w.shape[0], w.shape[1]
        per_group_out = out_ch // group
        fibre = w.reshape(out_ch, per_group_in, -1)
        uses = np.abs(fibre).sum(2) > 0
        state = np.empty(out_ch, np.int8)
        value = np.empty(out_ch)
        for n in range(out_ch):
            g = n // per_group_out
            xs = x.take(slice(g * per_group_in, (g + 1) * per_group_in))
            if np.any(uses[n] & (xs.state == LIVE)) or (padded and np.any(uses[n] & (xs.state == CONSTANT))):
                state[n], value[n] = LIVE, np.nan
                continue
            total = b[n] + float(np.sum(np.where(uses[n], xs.known_values, 0.0) * fibre[n].sum(1)))
            state[n], value[n] = (ZERO, 0.0) if total == 0 else (CONSTANT, total)
        return [Channels(state, value)]

    def in_axes(self, node):
        return [1] + [None] * (len(node.inputs) - 1)

    def couple(self, node, ids, ctx):
        w = const_array(input_or_none(node, 1))
        n_out = channel_count(node.outputs[0])
        x = ids[0]
        if w is None:
            return Decline("its weight is computed at run time")
        if n_out is None:
            return Decline("its output channel count is unknown")
        if w.ndim > 0 and _bias(node, w.shape[0]) is None:
            return Decline("its bias is computed at run time")
        group = int(attr_value(node, "group", 1))
        if group != 1 and x is None:
            return Decline("a grouped conv whose input channels cannot be followed")
        out = ctx.fresh(n_out)
        if group != 1:
            per_in, per_out = len(x) // group, n_out // group
            for g in range(group):
                members = x[g * per_in:(g + 1) * per_in] + out[g * per_out:(g + 1) * per_out]
                for m in members[1:]:
                    ctx.union(members[0], m)
        return [out]

    def backward(self, node, needed, ins):
        w = const_array(node.inputs[1])
        out_ch, per_in = w.shape[0], w.shape[1]
        group = int(attr_value(node, "group", 1))
        want = _needed_or_all(needed[0], out_ch)
        uses = np.abs(w.reshape(out_ch, per_in, -1)).sum(2) > 0  # (out, in per group)
        per_out = out_ch // group
        need_in = np.concatenate([(uses[g * per_out:(g + 1) * per_out] & want[g * per_out:(g + 1) * per_out, None]).any(0)
                                  for g in range(group)])
        return [need_in] + [None] * (len(node.inputs) - 1)

    def rewrite(self, graph, node, keep_in, keep_out):
        kin, kout = keep_in[0], keep_out[0]
        w = const_tensor(node.inputs[1])
        group = int(attr_value(node, "group", 1))
        if kout is not None:
            w = w[kout]
            b = input_or_none(node, 2)
            if b is not None:
                set_const(graph, node, 2, const_tensor(b)[kout])
        if group == 1 and kin is not None:
            w = w[:, kin]
        elif group != 1 and kin is not None:
            kept_groups = int(kin.reshape(group, -1).all(1).sum())
            node.attributes["group"] = ir.AttrInt64("group", kept_groups)
        set_const(graph, node, 1, w)
        return True


@register("ConvTranspose")
class ConvTranspose(OpRule):
    """Weight (in, out / group, kh, kw). A constant input is not constant at the output's border."""

    def _weight(self, node):
        w = const_array(input_or_none(node, 1))
        if w is None or int(attr_value(node, "group", 1)) != 1:
            return None
        return w

    def forward(self, node, ins):
        x, w = ins[0], self._weight(node)
        if x is None or w is None:
            return [None]
        b = _bias(node, w.shape[1])
        if b is None:
            return [None]
        uses = np.abs(w.reshape(w.shape[0], w.shape[1], -1)).sum(2) > 0  # (in, out)
        live = (uses & (x.state != ZERO)[:, None]).any(0)
        return [Channels.known(b).with_live(live)]

    def in_axes(self, node):
        return [1] + [None] * (len(node.inputs) - 1)

    def couple(self, node, ids, ctx):
        n_out = channel_count(node.outputs[0])
        w = self._weight(node)
        if w is None:
            return Decline("a grouped ConvTranspose, or a weight computed at run time")
        if n_out is None or _bias(node, w.shape[1]) is None:
            return Decline("unknown output channels or a bias computed at run time")
        return [ctx.fresh(n_out)]

    def backward(self, node, needed, ins):
        w = const_array(node.inputs[1])
        want = _needed_or_all(needed[0], w.shape[1])
        uses = np.abs(w.reshape(w.shape[0], w.shape[1], -1)).sum(2) > 0
        return [(uses & want[None, :]).any(1)] + [None] * (len(node.inputs) - 1)

    def rewrite(self, graph, node, keep_in, keep_out):
        kin, kout = keep_in[0], keep_out[0]
        w = const_tensor(node.inputs[1])
        w = w[kin] if kin is not None else w
        if kout is not None:
            w = w[:, kout]
            b = input_or_none(node, 2)
            if b is not None:
                set_const(graph, node, 2, const_tensor(b)[kout])
        set_const(graph, node, 1, w)
        return True


class Dense(OpRule):
    """Gemm and MatMul of a (batch, features) input by a constant matrix: features are channels."""

    def matrix(self, node) -> np.ndarray | None:
        """The weight as (in, out), or None when this node is not such a layer."""
        raise NotImplementedError

    def bias_and_scale(self, node, n_out: int) -> tuple[np.ndarray, float] | None:
        return np.zeros(n_out), 1.0

    def forward(self, node, ins):
        x, w = ins[0], self.matrix(node)
        if x is None or w is None or len(x) != w.shape[0]:
            return [None]
        bs = self.bias_and_scale(node, w.shape[1])
        if bs is None:
            return [None]
        bias, alpha = bs
        uses = np.abs(w) > 0
        live = (uses & (x.state == LIVE)[:, None]).any(0)
        return [Channels.known(bias + alpha * (x.known_values @ w)).with_live(live)]

    def in_axes(self, node):
        rank = rank_of(node.inputs[0]) if node.inputs else None
        return [None if rank is None else rank - 1] + [None] * (len(node.inputs) - 1)

    def out_axes(self, node):
        rank = rank_of(node.outputs[0])
        return [None if rank is None else rank - 1]

    def couple(self, node, ids, ctx):
        n_out = channel_count(node.outputs[0])
        if self.matrix(node) is None:
            return Decline("not an input times a constant matrix")
        if n_out is None or self.bias_and_scale(node, n_out) is None:
            return Decline("unknown output features, or a bias that is not one value per feature")
        return [ctx.fresh(n_out)]

    def backward(self, node, needed, ins):
        w = self.matrix(node)
        want = _needed_or_all(needed[0], w.shape[1])
        return [((np.abs(w) > 0) & want[None, :]).any(1)] + [None] * (len(node.inputs) - 1)


@register("Gemm")
class Gemm(Dense):
    def matrix(self, node):
        w = const_array(input_or_none(node, 1))
        if w is None or w.ndim != 2 or attr_value(node, "transA", 0) or rank_of(node.inputs[0]) != 2:
            return None
        return w.T if attr_value(node, "transB", 0) else w

    def bias_and_scale(self, node, n_out):
        c = input_or_none(node, 2)
        alpha, beta = float(attr_value(node, "alpha", 1.0)), float(attr_value(node, "beta", 1.0))
        if c is None:
            return np.zeros(n_out), alpha
        arr = const_array(c)
        # One value per output column: a scalar, (M,) or (1, M); a (M, 1) C adds per row instead.
        if arr is None or (arr.size != 1 and (arr.size != n_out or (arr.ndim == 2 and arr.shape[0] != 1))):
            return None
        return np.broadcast_to(beta * arr.reshape(-1), (n_out,)), alpha

    def rewrite(self, graph, node, keep_in, keep_out):
        kin, kout = keep_in[0], keep_out[0]
        w = const_tensor(node.inputs[1])
        if attr_value(node, "transB", 0):
            w = w[kout] if kout is not None else w
            w = w[:, kin] if kin is not None else w
        else:
            w = w[kin] if kin is not None else w
            w = w[:, kout] if kout is not None else w
        set_const(graph, node, 1, w)
        c = input_or_none(node, 2)
        if c is not None and kout is not None:
            b = const_tensor(c)
            if b.size == len(kout):
                set_const(graph, node, 2, b.reshape(-1)[kout].reshape((-1,) if b.ndim == 1 else (1, -1)))
        return True


@register("MatMul")
class MatMul(Dense):
    def matrix(self, node):
        w = const_array(input_or_none(node, 1))
        rank = rank_of(node.inputs[0])
        if w is None or w.ndim != 2 or rank is None or rank < 2:
            return None
        return w

    def rewrite(self, graph, node, keep_in, keep_out):
        kin, kout = keep_in[0], keep_out[0]
        w = const_tensor(node.inputs[1])
        w = w[kin] if kin is not None else w
        w = w[:, kout] if kout is not None else w
        set_const(graph, node, 1, w)
        return True


@register("BatchNormalization")
class BatchNorm(PassThrough):
    def in_axes(self, node):
        return [1] + [None] * (len(node.inputs) - 1)

    def forward(self, node, ins):
        x = ins[0]
        params = [const_array(input_or_none(node, i)) for i in range(1, 5)]
        if x is None or any(p is None for p in params):
            return [None] * len(node.outputs)
        scale, bias, mean, var = params
        eps = float(attr_value(node, "epsilon", 1e-5))
        vals = scale / np.sqrt(var + eps) * (x.known_values - mean) + bias
        live = ~x.is_known & (scale != 0)
        return [Channels.known(vals).with_live(live)] + [None] * (len(node.outputs) - 1)

    def couple(self, node, ids, ctx):
        if any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[1:]):
            return Decline("its training-mode statistics are read")
        if any(const_array(input_or_none(node, i)) is None for i in range(1, 5)):
            return Decline("its parameters are computed at run time")
        return super().couple(node, ids, ctx)

    def rewrite(self, graph, node, keep_in, keep_out):
        kout = keep_out[0]
        if kout is None:
            return False
        for i in range(1, 5):
            set_const(graph, node, i, const_tensor(node.inputs[i])[kout])
        return True
