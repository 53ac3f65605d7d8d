"""Attention heads of multi-head self-attention written out, found in the torch.fx graph.

The form followed: q, k and v Linears on (batch, tokens, dim), each viewed as (batch, tokens, heads, head_dim)
and transposed to (batch, heads, tokens, head_dim); either q @ k^T (k transposed on its last two axes), scaled
by a number, softmaxed over the keys (dropout allowed), @ v, or F.scaled_dot_product_attention(q, k, v); then
transposed back, reshaped to (batch, tokens, heads * head_dim) and read by one output Linear. Every value on
the way has that one reader, so nothing else sees a head. Head h owns rows h*head_dim..(h+1)*head_dim of q, k
and v (and their biases) and those columns of the output projection: when they are zero, the head's values
are zero, so is what it adds to the output whatever its attention weights, and deleting it is exact.

Anything else (a packed qkv, nn.MultiheadAttention, a mask tensor, heads mixed before the projection) is not
recognised, and its features stay pinned by the walls of structure.py.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .last_axis import matmul_macs

aten = torch.ops.aten
_MATMUL = {operator.matmul, torch.matmul, aten.matmul.default}
_SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_SOFTMAX = {F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default}
_SCALE = {operator.mul, operator.truediv, torch.mul, torch.div, aten.mul.Tensor, aten.div.Tensor}
_DROPOUT = {F.dropout, aten.dropout.default}


@dataclass(frozen=True)
class Heads:
    """One attention: its four Linears, its heads and the module whose `num_heads` its forward reads."""

    q: str
    k: str
    v: str
    proj: str
    num_heads: int
    head_dim: int
    owner: str | None  # the module holding `num_heads` (None: thinning cannot rewrite the head count)
    product_macs: int  # multiply-accumulates per sample of the attention products, per head


def find(gm: fx.GraphModule, modules: dict, layers: dict, shape_of, batch: int, owners: dict) -> list[Heads]:
    """Every attention of that form; `owners` are the model's own modules (the traced graph keeps only those
    it calls), where the one holding `num_heads` is looked up."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.Linear):
            continue
        heads = _attention_before(node, modules, layers, shape_of, batch, owners)
        if heads is not None:
            found.append(heads)
    return found


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_method_or_fn(node: fx.Node, methods: tuple[str, ...], functions: set) -> bool:
    return (node.op == "call_method" and node.target in methods) or \
        (node.op == "call_function" and node.target in functions)


def _swaps(node: fx.Node, i: int, j: int, rank: int) -> bool:
    """transpose(i, j) or the permute that swaps only i and j."""
    if _is_method_or_fn(node, ("transpose",), {torch.transpose, aten.transpose.int}):
        dims = [d % rank for d in node.args[1:3] if isinstance(d, int)]
        return len(dims) == 2 and sorted(dims) == sorted((i, j))
    if _is_method_or_fn(node, ("permute",), {torch.permute, aten.permute.default}):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        want = list(range(rank))
        want[i], want[j] = want[j], want[i]
        return [d % rank if isinstance(d, int) else d for d in dims] == want
    return False


def _is_reshape(node: fx.Node) -> bool:
    return _is_method_or_fn(node, ("view", "reshape"), {torch.reshape, aten.view.default, aten.reshape.default})


def _split_heads(node: fx.Node, modules: dict, layers: dict, shape_of) -> tuple[str, int, int] | None:
    """(Linear, heads, head_dim) when `node` is Linear(x).view(b, s, heads, head_dim).transpose(1, 2)."""
    if not isinstance(node, fx.Node) or not _swaps(node, 1, 2, 4):
        return None
    view = node.args[0]
    if not isinstance(view, fx.Node) or not _is_reshape(view) or _only_user(view) is not node:
        return None
    lin = view.args[0]
    if not isinstance(lin, fx.Node) or lin.op != "call_module" or _only_user(lin) is not view:
        return None
    name = str(lin.target)
    lay = layers.get(name)
    src, out = shape_of(lin), shape_of(view)
    if lay is None or lay.kind != "linear" or lay.calls != 1 or src is None or out is None or len(src) != 3 \
            or len(out) != 4 or out[:2] != src[:2] or out[2] * out[3] != src[2]:
        return None
    return name, out[2], out[3]


def _scores_source(node: fx.Node, modules: dict) -> fx.Node | None:
    """Back from what @ v reads, through dropout, softmax over the keys and scaling by a number: q @ k^T."""
    at = node
    seen_softmax = False
    while isinstance(at, fx.Node):
        if at.op == "call_module" and isinstance(modules.get(str(at.target)), nn.Dropout) or \
                at.op == "call_function" and at.target in _DROPOUT:
            pass
        elif _is_method_or_fn(at, ("softmax",), _SOFTMAX):
            dim = at.args[1] if len(at.args) > 1 else at.kwargs.get("dim")
            if dim not in (-1, 3) or seen_softmax:
                return None
            seen_softmax = True
        elif _is_method_or_fn(at, ("mul", "div"), _SCALE):
            if len(at.args) < 2 or not isinstance(at.args[1], (int, float)):
                return None
        elif _is_method_or_fn(at, ("matmul",), _MATMUL):
            return at if seen_softmax else None
        else:
            return None
        nxt = at.args[0]
        if not isinstance(nxt, fx.Node) or _only_user(nxt) is not at:
            return None
        at = nxt
    return None


def _attention_before(proj: fx.Node, modules: dict, layers: dict, shape_of, batch: int,
                      owners: dict) -> Heads | None:
    name = str(proj.target)
    lay = layers.get(name)
    merged = proj.args[0] if proj.args else None
    if lay is None or lay.calls != 1 or not isinstance(merged, fx.Node) or not _is_reshape(merged):
        return None
    back = merged.args[0]
    if not isinstance(back, fx.Node) or _only_user(back) is not merged or _only_user(merged) is not proj:
        return None
    if _is_method_or_fn(back, ("contiguous",), set()):
        back = back.args[0]
    if not isinstance(back, fx.Node) or not _swaps(back, 1, 2, 4):
        return None
    out = back.args[0]
    if not isinstance(out, fx.Node) or _only_user(out) is not back:
        return None
    if out.op == "call_function" and out.target in _SDPA:
        if len(out.args) != 3 or any(out.kwargs.get(k) is not None for k in ("attn_mask",)) or \
                set(out.kwargs) - {"attn_mask", "dropout_p", "is_causal", "scale"}:
            return None
        q4, k4, v4 = out.args
        products = [out]
    elif _is_method_or_fn(out, ("matmul",), _MATMUL) and len(out.args) == 2:
        probs, v4 = out.args
        if not isinstance(probs, fx.Node) or _only_user(probs) is not out:
            return None  # attention weights read elsewhere too (returned, say) would change with the heads
        scores = _scores_source(probs, modules)
        if scores is None or len(scores.args) != 2:
            return None
        q4, kt = scores.args
        if not isinstance(kt, fx.Node) or not _swaps(kt, 2, 3, 4) or _only_user(kt) is not scores:
            return None
        k4 = kt.args[0]
        products = [scores, out]
    else:
        return None
    parts = [_split_heads(n, modules, layers, shape_of) for n in (q4, k4, v4)]
    if any(p is None for p in parts) or not all(_only_user(n) is not None for n in (q4, k4, v4)):
        return None
    (q, heads, dim), (k, hk, dk), (v, hv, dv) = parts
    merged_shape = shape_of(merged)
    if (hk, dk) != (heads, dim) or (hv, dv) != (heads, dim) or len({q, k, v, name}) != 4 or \
            merged_shape is None or merged_shape[-1] != heads * dim or layers[name].weight_shape[1] != heads * dim:
        return None
    macs = sum(matmul_macs(p, shape_of, batch, modules) for p in products)
    return Heads(q, k, v, name, heads, dim, _owner(owners, (q, k, v, name), heads), macs // heads)


def _owner(modules: dict, names: tuple[str, ...], heads: int) -> str | None:
    """The closest module above all four Linears whose `num_heads` is the head count."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for tokens in zip(*parts):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    while True:
        prefix = ".".join(common)
        mod = modules.get(prefix)
        if mod is not None and not isinstance(mod, nn.MultiheadAttention) and getattr(mod, "num_heads", None) == heads:
            return prefix
        if not common:
            return None
        common.pop()
