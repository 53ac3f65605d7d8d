"""Channel coupling of an ONNX graph: which channels of which tensors are one and the same.

Every channel gets an id. Ops that keep each channel apart (activations, pooling, BatchNorm,
elementwise ops with a per-channel constant) keep its ids; ops that combine tensors elementwise
(Add, Sub, Mul, Div) merge the ids of their operands, since a channel can only be deleted from
all of them at once; Concat concatenates ids; Flatten repeats each id over the spatial
positions; Conv and Gemm write fresh ids. Anything else is a wall: what it reads and writes is
pinned, as are the graph's inputs and outputs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..channel_ids import ChannelIds
from .channels import attr_value, channel_count, channel_operand, const_array

# Ops whose output channel c reads only input channel c (the first input), with any other
# inputs constants.
_PASS_THROUGH = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
    "Identity", "Neg", "Dropout", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "BatchNormalization", "ReduceMean", "ReduceMax",
}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}


class Coupling(ChannelIds):
    """Channel ids of every value with a channel axis (value name -> id per position of axis 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, list[int]] = {}

    def roots_of(self, name: str) -> np.ndarray:
        return np.array([self.root(i) for i in self.ids[name]], dtype=np.int64)


def couple(model: ir.Model) -> Coupling:
    c = Coupling()
    for v in model.graph.inputs:
        n = channel_count(v)
        if n is not None:
            c.ids[v.name] = c.fresh(n, pinned="graph input")

    def ids(v: ir.Value | None) -> list[int] | None:
        return c.ids.get(v.name) if v is not None else None

    for node in model.graph:
        out = node.outputs[0] if node.outputs else None
        n_out = channel_count(out) if out is not None else None
        x = ids(node.inputs[0]) if node.inputs else None
        result: list[int] | None = None
        op = node.op_type if node.domain in ("", "ai.onnx") else None
        if op in ("Conv", "Gemm") and n_out is not None:
            group = int(attr_value(node, "group", 1)) if op == "Conv" else 1
            if group != 1 and x is not None:
                c.pin(x, f"grouped Conv {node.name}")
                result = c.fresh(n_out, pinned=f"grouped Conv {node.name}")
            elif op == "Gemm" and (attr_value(node, "transA", 0) or const_array(node.inputs[1]) is None):
                result = None
            else:
                result = c.fresh(n_out)
        elif op in _PASS_THROUGH and x is not None and n_out == len(x):
            result = list(x)
        elif op in _ELEMENTWISE and n_out is not None:
            operands = [ids(v) for v in node.inputs[:2]]
            tensors = [o for o in operands if o is not None]
            if len(tensors) == 2 and len(tensors[0]) == len(tensors[1]) == n_out:
                for a, b in zip(*tensors, strict=True):
                    c.union(a, b)
                result = list(tensors[0])
            elif len(tensors) == 1 and len(tensors[0]) == n_out:
                other = node.inputs[1] if operands[0] is not None else node.inputs[0]
                if channel_operand(other, None, n_out, len(out.shape)) is not None:
                    result = list(tensors[0])
        elif op == "Flatten" and x is not None and n_out is not None and int(attr_value(node, "axis", 1)) == 1:
            spatial = n_out // max(1, len(x))
            if spatial * len(x) == n_out:
                result = [i for i in x for _ in range(spatial)]
        elif op == "Concat" and n_out is not None:
            parts = [ids(v) for v in node.inputs]
            rank = len(out.shape) if out.shape is not None else 0
            if rank and int(attr_value(node, "axis", 0)) % rank == 1 and all(p is not None for p in parts):
                result = [i for p in parts for i in p]
        if result is None:
            why = f"{node.op_type} {node.name}"
            for v in node.inputs:
                if ids(v) is not None:
                    c.pin(ids(v), why)
            for v in node.outputs:
                m = channel_count(v)
                if m is not None:
                    c.ids[v.name] = c.fresh(m, pinned=why)
            continue
        c.ids[out.name] = result
    for v in model.graph.outputs:
        if v.name in c.ids:
            c.pin(c.ids[v.name], "graph output")
    return c
