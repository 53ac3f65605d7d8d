"""The pass that writes a trip of the heads through the batch axis as the Transposes it is.

On the way the heads run on the batch axis, where no channel can be followed; written as a Reshape
that only splits the last axis and one Transpose, they keep an axis of their own. Two trips:

- the dynamo exporter's K^T of ``scaled_dot_product_attention``: Reshape (B, H, S, Dh) ->
  (B * H, S, Dh), Transpose(s) leaving the merged axis first, Reshape back to (B, H, Dh, S): one
  Transpose of the 4-D tensor;
- nn.MultiheadAttention's way in: (S, B, D) -> (S, B * H, Dh), Transpose(s) putting B * H first,
  -> (B, H, S, Dh): Reshape (S, B, D) -> (S, B, H, Dh) (the zeros copy S and B) and one Transpose;
- the first with grouped-query attention's repeat folded in (dynamo's K^T of keys repeated by
  repeat_kv): (B, Hkv, R, S, Dh) -> (B * Hkv * R, S, Dh), Transpose(s), -> (B, Hkv * R, Dh, S): the
  Reshape that merges the copies, (B, Hkv * R, S, Dh), and one Transpose.

Rewritten only where the shapes prove it: the sizes on both sides of the trip are the same integers
or the same named symbols, axis by axis; in nn.MultiheadAttention's trip one symbol named apart on the two
sides (the batch, where onnxsim left the targets computed at run time) is proven by the element count when
every other size is an integer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .ops.base import add_initializer, attr_value


def _same(a, b) -> bool:
    """Equal integers, or the same named symbol."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and getattr(a, "value", None) is not None and a == b


def _only_reader(value: ir.Value, op: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output() or uses[0].idx != 0:
        return None
    node = uses[0].node
    return node if node.op_type == op and node.domain in ("", "ai.onnx") else None


def _transposes_to_reshape(value: ir.Value, rank: int) -> tuple[list[ir.Node], list[int], ir.Node] | None:
    """One or more Transposes, each the only reader of what it reads, then a Reshape: (the Transposes,
    their permutations composed, the Reshape)."""
    chain: list[ir.Node] = []
    perm = list(range(rank))
    while True:
        node = _only_reader(value, "Transpose")
        if node is None:
            break
        p = [int(a) for a in attr_value(node, "perm", list(range(rank))[::-1])]
        if len(p) != rank:
            return None
        perm = [perm[a] for a in p]
        chain.append(node)
        value = node.outputs[0]
    split = _only_reader(value, "Reshape")
    if not chain or split is None or split.outputs[0].shape is None:
        return None
    return chain, perm, split


def _round_trip(merge: ir.Node) -> tuple[list[ir.Node], ir.Node, list[int]] | None:
    x, y = merge.inputs[0], merge.outputs[0]
    if x is None or x.shape is None or y.shape is None or len(x.shape) < 3 or len(y.shape) != len(x.shape) - 1:
        return None
    xs, ys = list(x.shape), list(y.shape)
    if not all(_same(a, b) for a, b in zip(ys[1:], xs[2:], strict=True)):
        return None
    if not (isinstance(xs[0], int) and isinstance(xs[1], int) and ys[0] == xs[0] * xs[1]) \
            and not (isinstance(xs[1], int) and not isinstance(ys[0], int)):
        return None  # the merged size is not (or cannot be) the two leading sizes
    trip = _transposes_to_reshape(y, len(ys))
    if trip is None or trip[1][0] != 0:
        return None
    transposes, perm, split = trip
    zs, ts = list(split.outputs[0].shape), [ys[p] for p in perm]  # the Transposes' own output sizes
    if len(zs) != len(xs) or not (_same(zs[0], xs[0]) and _same(zs[1], xs[1])) \
            or not all(_same(a, b) for a, b in zip(zs[2:], ts[1:], strict=True)):
        return None
    return transposes, split, [0, 1] + [int(p) + 1 for p in perm[1:]]


class HeadRoundTripPass(ir.passes.InPlacePass):
    """Reshape-merge, Transpose, Reshape-split of the two leading axes -> one Transpose."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        changed = False
        for merge in list(graph):
            if merge.op_type != "Reshape" or merge.domain not in ("", "ai.onnx") or merge.graph is not graph:
                continue
            trip = _round_trip(merge)
            if trip is not None:
                transposes, split, perm = trip
                self._replace(graph, merge, transposes, split, merge.inputs[0], perm)
                changed = True
                continue
            trip3 = _repeat_round_trip(merge)
            if trip3 is not None:
                transposes, split, perm = trip3
                x = merge.inputs[0]
                b, kv, copies, _, dh = list(x.shape)
                out = split.outputs[0]
                target = add_initializer(graph, f"{split.name or out.name}.repeated_shape",
                                         np.array([0, kv * copies, -1, dh], np.int64))
                heads_value = ir.Value(name=f"{out.name}.repeated", type=out.type,
                                       shape=ir.Shape([b, kv * copies, x.shape[3], dh]))
                reshape = ir.Node("", "Reshape", [x, target], outputs=[heads_value],
                                  name=f"{split.name or out.name}.merge_copies")
                graph.insert_after(split, reshape)
                self._replace(graph, merge, transposes, split, heads_value, perm, after=reshape)
                changed = True
                continue
            trip2 = _batch_head_trip(merge)
            if trip2 is not None:
                transposes, split, heads, head_dim, atoms = trip2
                x = merge.inputs[0]
                out = split.outputs[0]
                target = add_initializer(graph, f"{split.name or out.name}.heads_shape",
                                         np.array([0, 0, heads, head_dim], np.int64))
                heads_value = ir.Value(name=f"{out.name}.heads", shape=ir.Shape([x.shape[0], x.shape[1], heads, head_dim]),
                                       type=out.type)
                reshape = ir.Node("", "Reshape", [x, target], outputs=[heads_value], name=f"{split.name or out.name}.to_heads")
                graph.insert_after(split, reshape)
                self._replace(graph, merge, transposes, split, heads_value, atoms, after=reshape)
                changed = True
        return ir.passes.PassResult(model, changed)

    @staticmethod
    def _replace(graph: ir.Graph, merge: ir.Node, transposes: list[ir.Node], split: ir.Node, source: ir.Value,
                 perm: list[int], after: ir.Node | None = None) -> None:
        """split's output becomes Transpose(source, perm); the three nodes of the trip go."""
        out = split.outputs[0]
        name = out.name
        new = ir.Value(name=f"{name}.transposed", shape=out.shape, type=out.type)
        node = ir.Node("", "Transpose", [source], attributes=[ir.AttrInt64s("perm", perm)],
                       outputs=[new], name=f"{split.name or name}.as_transpose")
        graph.insert_after(after or split, node)
        out.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove([split, *reversed(transposes), merge], safe=True)
        new.name = name


def _repeat_round_trip(merge: ir.Node) -> tuple[list[ir.Node], ir.Node, list[int]] | None:
    """(B, Hkv, R, S, Dh) -> (B * Hkv * R, S, Dh) -> Transposes that leave the merged axis first -> (B, Hkv * R,
    ...): (the Transposes, the second Reshape, the permutation of the 4-D (B, Hkv * R, S, Dh)) where the shapes
    prove it."""
    x, y = merge.inputs[0], merge.outputs[0]
    if x is None or x.shape is None or y.shape is None or len(x.shape) != 5 or len(y.shape) != 3:
        return None
    xs, ys = list(x.shape), list(y.shape)
    if not (isinstance(xs[1], int) and isinstance(xs[2], int) and isinstance(xs[4], int)) or \
            not all(_same(a, b) for a, b in zip(ys[1:], xs[3:], strict=True)):
        return None
    heads = xs[1] * xs[2]
    if not (isinstance(xs[0], int) and ys[0] == xs[0] * heads) and isinstance(ys[0], int):
        return None  # the merged size is not (or cannot be) the three leading sizes
    trip = _transposes_to_reshape(y, 3)
    if trip is None or trip[1][0] != 0:
        return None
    transposes, perm, split = trip
    zs, ts = list(split.outputs[0].shape), [ys[p] for p in perm]
    if len(zs) != 4 or not _same(zs[0], xs[0]) or zs[1] != heads or \
            not all(_same(a, b) for a, b in zip(zs[2:], ts[1:], strict=True)):
        return None
    return transposes, split, [0, 1] + [int(p) + 1 for p in perm[1:]]


def _batch_head_trip(merge: ir.Node) -> tuple[list[ir.Node], ir.Node, int, int, list[int]] | None:
    """nn.MultiheadAttention's (S, B, D) -> (S, B * H, Dh) -> Transposes that put B * H first -> (B, H, ...):
    (the Transposes, the second Reshape, H, Dh, the permutation of (S, B, H, Dh)) where the shapes prove it."""
    x, y = merge.inputs[0], merge.outputs[0]
    if x is None or x.shape is None or y.shape is None or len(x.shape) != 3 or len(y.shape) != 3:
        return None
    (a0, a1, d), (b0, _, dh) = list(x.shape), list(y.shape)
    if not (isinstance(d, int) and isinstance(dh, int) and dh > 0 and d % dh == 0 and _same(a0, b0)):
        return None
    trip = _transposes_to_reshape(y, 3)
    if trip is None or trip[1][0] != 1:
        return None
    transposes, perm, split = trip
    # Atoms of (S, B * H, Dh): S, B, H, Dh; the merged axis must come first, split back into B and H.
    groups = {0: [0], 1: [1, 2], 2: [3]}
    atoms = [a for p in perm for a in groups[p]]
    sizes = {0: a0, 1: a1, 2: d // dh, 3: dh}
    zs = list(split.outputs[0].shape)
    if len(zs) != 4:
        return None
    pairs = [(z, sizes[a]) for z, a in zip(zs, atoms, strict=True)]
    unproven = [p for p in pairs if not _same(*p)]
    # One symbolic size that inference named apart on the two sides (the batch, read from another value's
    # Shape) is still proven when every other size is an integer: both tensors hold as many elements.
    if unproven and not (len(unproven) == 1 and not any(isinstance(v, int) for v in unproven[0])
                         and sum(not isinstance(want, int) for _, want in pairs) == 1):
        return None
    return transposes, split, d // dh, dh, atoms
