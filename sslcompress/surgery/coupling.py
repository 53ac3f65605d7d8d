"""Channel coupling of an ONNX graph: which channels of which values are one and the same.

Every channel gets an id; the op rules (ops/) say which output channels are which input
channels. Elementwise ops merge the ids of their operands, since a channel can only be deleted
from all of them at once; Concat stacks ids, Split and Slice select them, Flatten repeats each
id over its spatial positions, Transpose carries them to another axis; Conv, Gemm and MatMul
write fresh ids. A node whose rule declines is a wall: what it reads and writes is pinned, with
the rule's reason, as are the graph's inputs and outputs, and a value read on another axis than
the one its channels run on.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..channel_ids import ChannelIds
from .axes import reads_on_its_axis
from .ops import channel_axis, channel_count, rule_for
from .ops.base import Decline, const_tensor, label


class Coupling(ChannelIds):
    """Channel ids of every value with a channel axis (value -> id per position of that axis)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[ir.Value, list[int]] = {}
        self.walls: dict[ir.Node, str] = {}  # nodes whose channels are all pinned -> why

    def roots_of(self, value: ir.Value) -> np.ndarray:
        return np.array([self.root(i) for i in self.ids[value]], dtype=np.int64)

    def ids_of(self, value: ir.Value) -> list[int] | None:
        return self.ids.get(value)


def couple(model: ir.Model) -> Coupling:
    """Ids for every value; call after the layout analysis (``analyze`` runs it)."""
    c = Coupling()
    for v in model.graph.inputs:
        n = channel_count(v)
        if n is not None:
            c.ids[v] = c.fresh(n, pinned="graph input")

    for node in model.graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue  # its output is a constant operand, read by the rules as such
        rule = rule_for(node)
        fits = reads_on_its_axis(rule, node)
        ins: list[list[int] | None] = []
        for v, ok in zip(node.inputs, fits, strict=True):
            ids = c.ids.get(v) if v is not None else None
            if ids is not None and not ok:
                c.pin(ids, f"{label(node)} (reads channels on another axis than "
                           f"axis {channel_axis(v)}, where they run)")
                ids = None
            ins.append(ids)
        outs = rule.couple(node, ins, c) if rule is not None and node.outputs else None
        if outs is not None and not isinstance(outs, Decline):
            for v, ids in zip(node.outputs, outs, strict=False):
                n = channel_count(v)
                if n is not None:
                    c.ids[v] = ids if ids is not None and len(ids) == n else c.fresh(n, pinned=_wall(node))
                elif ids is not None:
                    # Channels flow into a value whose size is unknown: no reader of it could follow them.
                    c.pin(ids, f"{label(node)} (its output's channel count is unknown)")
            continue
        why = _wall(node, outs)
        c.walls[node] = why
        for ids in ins:
            if ids is not None:
                c.pin(ids, why)
        for v in node.outputs:
            n = channel_count(v)
            if n is not None:
                c.ids[v] = c.fresh(n, pinned=why)
    for v in model.graph.outputs:
        if v in c.ids:
            c.pin(c.ids[v], "graph output")
    for v, node in _read_by_subgraphs(model.graph).items():
        if v in c.ids:
            c.pin(c.ids[v], f"{label(node)} (read inside its subgraph)")
    return c


def _read_by_subgraphs(graph: ir.Graph) -> dict[ir.Value, ir.Node]:
    """Values of this graph that the body of an If, Loop or Scan reads from the outer scope, with the
    node whose body reads them: such a read is no input of any node here, so only a pin keeps it."""
    by_name = {v.name: v for v in graph.inputs}
    for node in graph:
        for v in node.outputs:
            by_name[v.name] = v
    found: dict[ir.Value, ir.Node] = {}
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                bodies = [attr.value]
            elif attr.type == ir.AttributeType.GRAPHS:
                bodies = list(attr.value)
            else:
                continue
            for body in bodies:
                for inner in ir.traversal.RecursiveGraphIterator(body):
                    for v in inner.inputs:
                        if v is None:
                            continue
                        if v.graph is graph:
                            found.setdefault(v, node)
                        elif v.graph is None and v.producer() is None and const_tensor(v) is None \
                                and v.name in by_name:
                            found.setdefault(by_name[v.name], node)  # an outer value as seen from the body
    return found


def _wall(node: ir.Node, answer: Decline | None = None) -> str:
    name = label(node)
    if rule_for(node) is None:
        domain = f" of domain {node.domain}" if node.domain not in ("", "ai.onnx") else ""
        return f"{name} (no rule for this op{domain})"
    if isinstance(answer, Decline):
        return f"{name} ({answer.reason})"
    return f"{name} (its rule cannot read this node)"
