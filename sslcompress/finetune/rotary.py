"""Rotary position embeddings between a projection's heads and the attention that reads them.

LLaMA-style attention rotates each head's queries and keys before the product:
``q * cos + rotate_half(q) * sin``, with ``rotate_half(x) = cat(-x2, x1)`` of the two halves of the head's
features (taken by chunk, split or slicing the last axis), and cos and sin built from positions alone. Every
op there works inside one head: along the head's features, with constants that are the same for every head
(size 1, or absent, on the batch and heads axes). So a head still owns exactly its rows of the projection,
and deleting a head is as exact as without the rotation; the surgery's rules say the same of the exported
Mul, Neg, Split/Slice and Concat (a Concat along the features holds every head in each part).

`rotated_from(node)` walks back from what the attention reads to the (batch, heads, tokens, head_dim) value
the rotation starts at, and returns it where everything on the way is such an op and nothing outside reads it.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .last_axis import is_split

aten = torch.ops.aten

_ARITHMETIC = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul,
         aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor}
_ARITHMETIC_METHODS = {"add", "sub", "mul"}
_NEG = {operator.neg, torch.neg, aten.neg.default}
_CATS = {torch.cat, torch.concat, aten.cat.default}
_SIZES = {"shape", "size"}
_LAST = (-1, 3)  # the head's features on a (batch, heads, tokens, head_dim) value


def rotated_from(node: fx.Node, shape_of) -> fx.Node | None:
    """The value a rotary embedding starts at, where `node` is such an embedding's output (module docstring);
    None where it is not one."""
    inside: set[fx.Node] = set()
    roots: set[fx.Node] = set()
    todo = [node]
    while todo:
        at = todo.pop()
        if at in inside:
            continue
        operands = _rotary_operands(at, shape_of)
        if operands is None:
            if at is node or not _is_head_value(at, shape_of):
                return None
            roots.add(at)  # where the rotation starts: a value of the attention's own shape, computed elsewhere
            continue
        inside.add(at)
        todo.extend(operands)
    if len(roots) != 1 or not inside:
        return None
    (root,) = roots
    # Nothing outside reads what the rotation computes, or the value it starts at (its size aside).
    if any(user not in inside and not reads_size(user) for n in (*inside, root) if n is not node
           for user in n.users):
        return None
    return root


def reads_size(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in _SIZES) \
        or (node.op == "call_method" and node.target in _SIZES)


def _rotary_operands(node: fx.Node, shape_of) -> list[fx.Node] | None:
    """The data operands a rotary op reads (constants and sizes left out); None for any other node."""
    if node.op not in ("call_function", "call_method"):
        return None
    target, args = node.target, node.args
    fn = node.op == "call_function"
    if (fn and target in _ARITHMETIC) or (not fn and target in _ARITHMETIC_METHODS):
        data = [a for a in args[:2] if isinstance(a, fx.Node) and not _data_free(a)]
        consts = [a for a in args[:2] if isinstance(a, fx.Node) and _data_free(a)]
        if not data or any(not _same_for_every_head(c, shape_of) for c in consts):
            return None
        return data
    if (fn and target in _NEG) or (not fn and target == "neg"):
        return [args[0]] if args and isinstance(args[0], fx.Node) else None
    if is_split(node):
        dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
        return [args[0]] if dim in _LAST and isinstance(args[0], fx.Node) else None
    if fn and target is operator.getitem and len(args) == 2 and isinstance(args[0], fx.Node):
        src, index = args
        if isinstance(index, int) and is_split(src):
            return [src]
        return [src] if _slices_last_axis(index) else None
    if (fn and target in _CATS) or (not fn and target == "cat"):
        parts = args[0] if args else None
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        if dim in _LAST and isinstance(parts, (list, tuple)) and all(isinstance(p, fx.Node) for p in parts):
            return list(parts)
    return None


def _slices_last_axis(index) -> bool:
    """x[..., a:b] (or x[:, :, :, a:b]) with whole numbers or sizes as bounds."""
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return False
    lead = index[:-1]
    if lead != (Ellipsis,) and not (len(lead) == 3 and all(s == slice(None) for s in lead)):
        return False
    bounds = (index[-1].start, index[-1].stop, index[-1].step)
    return all(b is None or isinstance(b, int) or (isinstance(b, fx.Node) and _data_free(b)) for b in bounds)


def _data_free(node: fx.Node, seen: dict | None = None) -> bool:
    """Whether the value holds no data of the model's input: built from parameters, buffers and numbers, or a
    size read off a tensor (x.shape[-1] // 2)."""
    if node.op == "get_attr":
        return True
    if node.op == "placeholder":
        return False
    if reads_size(node):
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    return all(_data_free(a) for a in node.all_input_nodes)


def _same_for_every_head(const: fx.Node, shape_of) -> bool:
    """A constant that broadcasts over the batch and heads axes of a (batch, heads, tokens, head_dim) value."""
    shape = shape_of(const)
    if shape is None:
        return False
    lead = tuple(shape)[:-2][-2:] if len(shape) > 2 else ()
    return len(shape) <= 4 and all(d == 1 for d in lead)


def _is_head_value(node: fx.Node, shape_of) -> bool:
    shape = shape_of(node)
    return shape is not None and len(shape) == 4
