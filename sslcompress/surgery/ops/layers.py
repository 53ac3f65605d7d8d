"""Layers with weights: Conv (grouped and depthwise too), ConvTranspose, Gemm, MatMul, BatchNorm.

A weighted layer writes new channels (fresh ids) and reads an input channel only through a
nonzero weight fibre; a zero input channel contributes nothing, zero padding included, so
deleting it with its fibre is exact. A grouped Conv loses channels per group: every group it
keeps must keep as many input channels and as many output channels as the others, so where the
dead channels fall unevenly its ``settle`` keeps some of them (the strongest first) until the
groups are equal again; a group with nothing left goes whole. A depthwise Conv (one input
channel per group) loses a channel with its outputs.

Weights may be constants or DequantizeLinear of constants (QDQ models): they read as their float
values, and the rewrite picks entries of the quantized tensor and its per-channel scale
(``take_const``), so the layer stays quantized.
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
    Keep,
    OpRule,
    PassThrough,
    attr_value,
    channel_count,
    const_array,
    const_tensor,
    input_or_none,
    quant_blocker,
    rank_of,
    refine_shape,
    register,
    take_const,
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


_PARAMS = {1: "weight", 2: "bias", 3: "mean", 4: "variance"}


def _quantized_decline(node, indices=(1, 2), names=None) -> Decline | None:
    """A Decline naming the first constant input whose quantization the surgery cannot slice."""
    for i in indices:
        why = quant_blocker(input_or_none(node, i))
        if why:
            return Decline(f"its {(names or _PARAMS).get(i, f'input {i}')} is {why}")
    return None


def _unread_weight(node, what: str) -> str:
    """Why a weight reads as no constant: quantized at run time, or computed."""
    v = input_or_none(node, 1)
    p = v.producer() if v is not None else None
    if p is not None and p.op_type == "DequantizeLinear":
        return f"its weight is dequantized from a tensor or with a scale computed at run time{what}"
    return f"its weight is computed at run time{what}"


def _take_rows_cols(graph, node, index: int, rows, cols) -> None:
    """Keep ``rows`` (axis 0) and ``cols`` (axis 1) of a constant input; None keeps them all."""
    if rows is None and cols is None:
        return

    def select(a):
        a = a[rows] if rows is not None else a
        return a[:, cols] if cols is not None else a
    take_const(graph, node, index, select)


def _strongest(candidates: np.ndarray, strength: np.ndarray, n: int) -> np.ndarray:
    """``n`` of the candidate positions, largest strength first (ties: lowest position)."""
    idx = np.nonzero(candidates)[0]
    order = np.argsort(-strength[idx], kind="stable")
    return idx[order[:n]]


@register("Conv")
class Conv(OpRule):
    def fill_shapes(self, node):
        """A spatial size that a stride-1 conv keeps (its padding makes up for its extent) stays the same
        symbol, so a residual Add sees equal shapes even where the input size is dynamic."""
        x, y = node.inputs[0], node.outputs[0]
        w = input_or_none(node, 1)
        if x is None or x.shape is None or w is None or w.shape is None or len(x.shape) != len(w.shape) \
                or attr_value(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return
        spatial = len(x.shape) - 2
        pads = list(attr_value(node, "pads", [0] * 2 * spatial))
        strides = list(attr_value(node, "strides", [1] * spatial))
        dil = list(attr_value(node, "dilations", [1] * spatial))
        dims = [x.shape[0], w.shape[0]]
        for i in range(spatial):
            k = w.shape[2 + i]
            keeps = strides[i] == 1 and isinstance(k, int) and pads[i] + pads[i + spatial] == dil[i] * (k - 1)
            dims.append(x.shape[2 + i] if keeps else None)
        refine_shape(y, dims)

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
        if len(x) != group * per_group_in:
            return [None]
        fibre = w.reshape(out_ch, per_group_in, -1)
        uses = np.abs(fibre).sum(2) > 0  # (out, in per group)
        # Each output channel against the input channels of its own group, all at once.
        group_of = np.arange(out_ch) // per_group_out
        st = x.state.reshape(group, per_group_in)[group_of]
        kv = x.known_values.reshape(group, per_group_in)[group_of]
        live = (uses & (st == LIVE)).any(1)
        if padded:  # zero padding makes a constant channel's border differ
            live |= (uses & (st == CONSTANT)).any(1)
        total = b + (np.where(uses, kv, 0.0) * fibre.sum(2)).sum(1)
        return [Channels.known(np.where(live, 0.0, total)).with_live(live)]

    def in_axes(self, node):
        return [1] + [None] * (len(node.inputs) - 1)

    def couple(self, node, ids, ctx):
        w = const_array(input_or_none(node, 1))
        n_out = channel_count(node.outputs[0])
        x = ids[0]
        if w is None:
            return Decline(_unread_weight(node, ""))
        if n_out is None:
            return Decline("its output channel count is unknown")
        if w.ndim > 0 and _bias(node, w.shape[0]) is None:
            return Decline("its bias is computed at run time")
        quantized = _quantized_decline(node)
        if quantized is not None:
            return quantized
        group = int(attr_value(node, "group", 1))
        if group != 1 and x is None:
            return Decline("a grouped conv whose input channels cannot be followed")
        out = ctx.fresh(n_out)
        if group != 1 and len(x) == group:
            # Depthwise: a channel and its outputs are one; a grouped conv's groups are kept equal
            # by settle instead, once the dead channels are known.
            per_out = n_out // group
            for g in range(group):
                for m in out[g * per_out:(g + 1) * per_out]:
                    ctx.union(x[g], m)
        return [out]

    def settle(self, node, keep_in, keep_out):
        """Per group, as many kept input and output channels as the fullest group: where the dead
        channels fall unevenly, the strongest of the others stay (any would be exact)."""
        group = int(attr_value(node, "group", 1))
        kin, kout = keep_in[0], keep_out[0]
        w = const_array(input_or_none(node, 1))
        if group == 1 or kin is None or kout is None or w is None or len(kin) == group:
            return None
        per_in, per_out = len(kin) // group, len(kout) // group
        gin, gout = kin.reshape(group, per_in), kout.reshape(group, per_out)
        active = gin.any(1) | gout.any(1)
        if not active.any():
            return None  # a wholly dead conv: the emptied value keeps a channel first
        n_in = max(int(gin[active].sum(1).max()), 1)
        n_out = max(int(gout[active].sum(1).max()), 1)
        mag = np.abs(w.reshape(w.shape[0], w.shape[1], -1)).sum(2)  # (out, in per group)
        more_in, more_out = np.zeros_like(kin), np.zeros_like(kout)
        for g in np.nonzero(active)[0]:
            rows = slice(g * per_out, (g + 1) * per_out)
            lack = n_out - int(gout[g].sum())
            if lack > 0:
                more_out[rows][_strongest(~gout[g], mag[rows].sum(1), lack)] = True
            lack = n_in - int(gin[g].sum())
            if lack > 0:
                more_in[g * per_in:(g + 1) * per_in][_strongest(~gin[g], mag[rows].sum(0), lack)] = True
        if not more_in.any() and not more_out.any():
            return None
        return Keep([more_in] + [None] * (len(node.inputs) - 1), [more_out],
                    f"keeps its {group} groups equal")

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
        if kout is not None and input_or_none(node, 2) is not None:
            take_const(graph, node, 2, lambda a: a[kout])
        if group == 1:
            _take_rows_cols(graph, node, 1, kout, kin)
            return True
        out_ch, per_in = w.shape[0], w.shape[1]
        kin = np.ones(per_in * group, bool) if kin is None else kin
        kout = np.ones(out_ch, bool) if kout is None else kout
        if per_in == 1:  # depthwise: each group's input and outputs go together
            kept = int(kin.reshape(group, -1).all(1).sum())
            _take_rows_cols(graph, node, 1, kout, None)
        else:
            gin, gout = kin.reshape(group, per_in), kout.reshape(group, -1)
            groups = np.nonzero(gin.any(1) | gout.any(1))[0]
            n_in, n_out = {int(gin[g].sum()) for g in groups}, {int(gout[g].sum()) for g in groups}
            if len(n_in) > 1 or len(n_out) > 1:
                raise AssertionError(f"Conv {node.name} would keep unequal groups ({n_in} in, {n_out} out)")
            per_out = out_ch // group
            picks = [(g * per_out + np.nonzero(gout[g])[0], np.nonzero(gin[g])[0]) for g in groups]
            take_const(graph, node, 1, lambda a: np.concatenate([a[r][:, c] for r, c in picks], axis=0))
            kept = len(groups)
        node.attributes["group"] = ir.AttrInt64("group", kept)
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
        return _quantized_decline(node) or [ctx.fresh(n_out)]

    def backward(self, node, needed, ins):
        w = const_array(node.inputs[1])
        want = _needed_or_all(needed[0], w.shape[1])
        uses = np.abs(w.reshape(w.shape[0], w.shape[1], -1)).sum(2) > 0
        return [(uses & want[None, :]).any(1)] + [None] * (len(node.inputs) - 1)

    def rewrite(self, graph, node, keep_in, keep_out):
        kin, kout = keep_in[0], keep_out[0]
        _take_rows_cols(graph, node, 1, kin, kout)
        if kout is not None and input_or_none(node, 2) is not None:
            take_const(graph, node, 2, lambda a: a[kout])
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
        if w is None:
            return [None]
        if x is None:
            # Input channels that cannot be followed (a LayerNorm's output, a graph input) are LIVE:
            # a feature whose weight column is zero is still zero, whatever reads it.
            x = Channels.live(w.shape[0])
        if len(x) != w.shape[0]:
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
            if const_tensor(input_or_none(node, 1)) is None:
                return Decline(_unread_weight(node, ", not a constant matrix"))
            return Decline("not an input times a constant matrix")
        if n_out is None or self.bias_and_scale(node, n_out) is None:
            return Decline("unknown output features, or a bias that is not one value per feature")
        return _quantized_decline(node) or [ctx.fresh(n_out)]

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
        if attr_value(node, "transB", 0):
            _take_rows_cols(graph, node, 1, kout, kin)
        else:
            _take_rows_cols(graph, node, 1, kin, kout)
        c = input_or_none(node, 2)
        if c is not None and kout is not None:
            b = const_tensor(c)
            if b.size == len(kout):
                take_const(graph, node, 2, lambda a: a.reshape(-1)[kout].reshape((-1,) if a.ndim == 1 else (1, -1)))
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
        _take_rows_cols(graph, node, 1, kin, kout)
        return True


@register("InstanceNormalization")
class InstanceNorm(PassThrough):
    """Each channel normalised over its own spatial positions: deleting a channel leaves the others as they
    were. A channel whose scale is zero writes its shift; so does an all-zero input channel (its mean and
    variance are 0, and 0 / sqrt(epsilon) is 0). Any other input, a constant one too, stays LIVE: a
    constant's computed mean need not be the constant to the last bit, and the epsilon magnifies the rest."""

    def in_axes(self, node):
        return [1] + [None] * (len(node.inputs) - 1)

    def forward(self, node, ins):
        x = ins[0]
        scale, bias = (const_array(input_or_none(node, i)) for i in (1, 2))
        if x is None or scale is None or bias is None or scale.shape != bias.shape or len(scale) != len(x):
            return [None] * len(node.outputs)
        known = (x.state == ZERO) | (scale == 0)
        return [Channels.known(bias.astype(np.float64)).with_live(~known)]

    def couple(self, node, ids, ctx):
        if any(const_array(input_or_none(node, i)) is None for i in (1, 2)):
            return Decline("its scale or shift is computed at run time")
        quantized = _quantized_decline(node, (1, 2), {1: "scale", 2: "shift"})
        return quantized or super().couple(node, ids, ctx)

    def rewrite(self, graph, node, keep_in, keep_out):
        kout = keep_out[0]
        if kout is None:
            return False
        for i in (1, 2):
            take_const(graph, node, i, lambda a: a[kout])
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
        quantized = _quantized_decline(node, range(1, 5), {1: "scale", 2: "bias", 3: "mean", 4: "variance"})
        return quantized or super().couple(node, ids, ctx)

    def rewrite(self, graph, node, keep_in, keep_out):
        kout = keep_out[0]
        if kout is None:
            return False
        for i in range(1, 5):
            take_const(graph, node, i, lambda a: a[kout])
        return True

