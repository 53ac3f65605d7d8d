"""Channel coupling of an ONNX graph: which channels of which tensors are one and the same.

Every channel gets an id; the op rules (ops/) say which output channels are which input
channels. Elementwise ops merge the ids of their operands, since a channel can only be deleted
from all of them at once; Concat stacks ids, Split and Slice select them, Flatten repeats each
id over its spatial positions; Conv, Gemm and MatMul write fresh ids. An op whose rule cannot
read the node is a wall: what it reads and writes is pinned, with the reason, as are the graph's
inputs and outputs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..channel_ids import ChannelIds
from .ops import channel_count, rule_for


class Coupling(ChannelIds):
    """Channel ids of every value with a channel axis (value name -> id per position of axis 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, list[int]] = {}
        self.walls: set[ir.Node] = set()  # nodes whose channels are all pinned

    def roots_of(self, name: str) -> np.ndarray:
        return np.array([self.root(i) for i in self.ids[name]], dtype=np.int64)


def couple(model: ir.Model) -> Coupling:
    c = Coupling()
    for v in model.graph.inputs:
        n = channel_count(v)
        if n is not None:
            c.ids[v.name] = c.fresh(n, pinned="graph input")

    for node in model.graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue  # its output is a constant operand, read by the rules as such
        ins = [c.ids.get(v.name) if v is not None else None for v in node.inputs]
        rule = rule_for(node)
        outs = rule.couple(node, ins, c) if rule is not None and node.outputs else None
        if outs is not None:
            for v, ids in zip(node.outputs, outs, strict=False):
                n = channel_count(v)
                if n is not None:
                    c.ids[v.name] = ids if ids is not None and len(ids) == n else c.fresh(n, pinned=_wall(node))
            continue
        why = _wall(node)
        c.walls.add(node)
        for ids in ins:
            if ids is not None:
                c.pin(ids, why)
        for v in node.outputs:
            n = channel_count(v)
            if n is not None:
                c.ids[v.name] = c.fresh(n, pinned=why)
    for v in model.graph.outputs:
        if v.name in c.ids:
            c.pin(c.ids[v.name], "graph output")
    for name, node in _read_by_subgraphs(model.graph).items():
        if name in c.ids:
            c.pin(c.ids[name], f"{node.op_type} {node.name} (read inside its subgraph)")
    return c


def _read_by_subgraphs(graph: ir.Graph) -> dict[str, ir.Node]:
    """Values of this graph that the body of an If, Loop or Scan reads by name (outer scope), with the
    node whose body reads them: such a read is no input of any node here, so only a pin keeps it."""
    found: dict[str, ir.Node] = {}
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
                        if v is not None and v.graph is not None and v.graph is graph:
                            found.setdefault(v.name, node)
                        elif v is not None and v.graph is None and v.producer() is None:
                            found.setdefault(v.name, node)  # an outer value as seen from the body
    return found


def _wall(node: ir.Node) -> str:
    known = rule_for(node) is not None
    return f"{node.op_type} {node.name}" + ("" if known else " (no rule for this op)")
