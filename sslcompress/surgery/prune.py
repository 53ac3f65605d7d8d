"""The pass that deletes dead channels: every channel that is exactly zero wherever it flows.

A channel id (see coupling.py) is dead when the channel analysis finds it ZERO in every tensor
that carries it and nothing pins it. Deleting it removes the filter (and bias) that writes it
from every Conv/Gemm, its BatchNorm statistics and per-channel constants, and the input fibre
that reads it from every consumer. A zero channel contributes exactly nothing to any consumer
(zero padding included), so the pruned graph computes what the original computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from .channels import ZERO, _attr, _const, analyze
from .coupling import couple


@dataclass(frozen=True)
class PruneResult:
    model: onnx.ModelProto
    channels_removed: int  # channel ids deleted
    tensors_changed: int


def dead_masks(model: ir.Model) -> tuple[dict[str, np.ndarray], int]:
    """Keep-mask (True = keep) per value with a channel axis, and how many ids die. An analysis."""
    states = analyze(model)
    c = couple(model)
    alive: set[int] = set(c.pinned)
    for name, ch in states.items():
        if name not in c.ids:
            continue
        roots = c.roots_of(name)
        alive.update(roots[ch.state != ZERO].tolist())
    for name in c.ids:
        if name not in states:
            alive.update(c.roots_of(name).tolist())
    while True:  # never empty a tensor: a fully dead tensor is depth's business, not ours
        emptied = [name for name in c.ids if not np.isin(c.roots_of(name), list(alive)).any()]
        if not emptied:
            break
        for name in emptied:
            alive.update(c.roots_of(name).tolist())
    all_roots = {c.root(i) for i in range(len(c.parent))}
    dead = all_roots - alive
    keep = {name: ~np.isin(c.roots_of(name), list(dead)) for name in c.ids}
    return keep, len(dead)


def prune_dead_channels(proto: onnx.ModelProto) -> PruneResult:
    """A new model without its dead channels."""
    model = ir.serde.deserialize_model(proto)
    keep, n_dead = dead_masks(model)
    changed = 0
    if n_dead:
        for node in list(model.graph):
            changed += _rewrite(model.graph, node, keep)
        _drop_unused_initializers(model.graph)
    out = ir.serde.serialize_model(model)
    # Shapes of every intermediate tensor changed: drop them and infer again.
    del out.graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    return PruneResult(out, n_dead, changed)


def _set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Replace a constant input; an initializer shared with other nodes is copied, not changed."""
    old = node.inputs[index]
    dtype = old.const_value.numpy().dtype
    array = np.ascontiguousarray(array.astype(dtype))
    if len(old.uses()) == 1 and not old.is_graph_output():
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        return
    name = f"{old.name}.{node.name or node.op_type}.{index}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(old.dtype),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    node.replace_input_with(index, value)


def _drop_unused_initializers(graph: ir.Graph) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def _rewrite(graph: ir.Graph, node: ir.Node, keep: dict[str, np.ndarray]) -> int:
    x = node.inputs[0] if node.inputs else None
    y = node.outputs[0] if node.outputs else None
    kin = keep.get(x.name) if x is not None else None
    kout = keep.get(y.name) if y is not None else None
    if (kin is None or kin.all()) and (kout is None or kout.all()):
        return 0
    op = node.op_type
    if op == "Conv":
        w = node.inputs[1].const_value.numpy()
        w = w[kout] if kout is not None else w
        w = w[:, kin] if kin is not None else w
        _set_const(graph, node, 1, w)
        if len(node.inputs) > 2 and node.inputs[2] is not None and kout is not None:
            _set_const(graph, node, 2, node.inputs[2].const_value.numpy()[kout])
        return 1
    if op == "Gemm":
        w = node.inputs[1].const_value.numpy()
        if _attr(node, "transB", 0):
            w = w[kout] if kout is not None else w
            w = w[:, kin] if kin is not None else w
        else:
            w = w[kin] if kin is not None else w
            w = w[:, kout] if kout is not None else w
        _set_const(graph, node, 1, w)
        if len(node.inputs) > 2 and node.inputs[2] is not None and kout is not None:
            b = node.inputs[2].const_value.numpy()
            if b.size == len(kout):
                _set_const(graph, node, 2, b.reshape(-1)[kout].reshape((-1,) if b.ndim == 1 else (1, -1)))
        return 1
    if op == "BatchNormalization" and kout is not None:
        for i in range(1, 5):
            _set_const(graph, node, i, node.inputs[i].const_value.numpy()[kout])
        return 1
    if op in ("Add", "Sub", "Mul", "Div") and kout is not None:
        for i in (0, 1):
            v = node.inputs[i]
            c = _const(v)
            if c is not None and c.size == len(kout) and c.size > 1:
                arr = v.const_value.numpy()
                shape = arr.shape
                axis = len(shape) - (len(y.shape) - 1)  # the channel axis, right-aligned
                _set_const(graph, node, i, np.compress(kout, arr, axis=axis))
        return 1
    return 0
