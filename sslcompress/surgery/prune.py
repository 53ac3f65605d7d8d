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

from .channels import CONSTANT, ZERO, analyze, attr_value, const_array
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
    alive: set[int] = set(c.pinned) | _read_roots(model, c)
    zero_everywhere: set[int] = {c.root(i) for i in range(len(c.parent))}
    for name, ch in states.items():
        if name in c.ids:
            zero_everywhere -= set(c.roots_of(name)[ch.state != ZERO].tolist())
    for name in c.ids:
        if name not in states:
            zero_everywhere -= set(c.roots_of(name).tolist())
    alive -= zero_everywhere - set(c.pinned)
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


def _read_roots(model: ir.Model, c) -> set[int]:
    """Channel ids some Conv or Gemm reads through a nonzero weight fibre.

    Every other reader either carries the id on (and its own readers count) or is a wall that
    pinned it, so an id outside this set and unpinned reaches no output: it is unused.
    """
    read: set[int] = set()
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm") or not node.inputs or node.inputs[0] is None:
            continue
        x = node.inputs[0]
        if x.name not in c.ids:
            continue
        roots = c.roots_of(x.name)
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or (node.op_type == "Conv" and int(attr_value(node, "group", 1)) != 1):
            read.update(roots.tolist())
            continue
        if node.op_type == "Conv":
            used = np.abs(w).reshape(w.shape[0], w.shape[1], -1).sum((0, 2)) > 0
        else:
            used = np.abs(w).sum(0 if attr_value(node, "transB", 0) else 1) > 0
        read.update(roots[used].tolist())
    return read


def fold_constant_channels(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold CONSTANT input channels of unpadded Convs and of Gemms into their biases.

    A channel that holds the value v everywhere adds v * (sum of its weight fibre) to each output,
    a constant; with no zero padding that holds at every output position, so the fibre can be
    zeroed and the constant moved into the bias. Padded convs keep such channels (the border
    sees the padding's zeros), as do grouped ones.
    """
    model = ir.serde.deserialize_model(proto)
    states = analyze(model)
    folded = 0
    for node in list(model.graph):
        if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        x = node.inputs[0]
        ch = states.get(x.name) if x is not None else None
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if ch is None or w is None or not np.any(ch.state == CONSTANT):
            continue
        if node.op_type == "Conv":
            pads = attr_value(node, "pads", None)
            if int(attr_value(node, "group", 1)) != 1 or (pads and any(pads)) or \
                    attr_value(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                continue
            cols = np.nonzero((ch.state == CONSTANT) & (np.abs(w).reshape(w.shape[0], w.shape[1], -1).sum((0, 2)) > 0))[0]
            if not len(cols):
                continue
            shift = (w[:, cols].reshape(w.shape[0], len(cols), -1).sum(2) * ch.value[cols]).sum(1)
            new_w = w.copy()
            new_w[:, cols] = 0
        else:
            if attr_value(node, "transA", 0):
                continue
            wt = w.T if attr_value(node, "transB", 0) else w  # (in, out)
            cols = np.nonzero((ch.state == CONSTANT) & (np.abs(wt).sum(1) > 0))[0]
            if not len(cols):
                continue
            shift = float(attr_value(node, "alpha", 1.0)) * (ch.value[cols] @ wt[cols])
            new_wt = wt.copy()
            new_wt[cols] = 0
            new_w = new_wt.T if attr_value(node, "transB", 0) else new_wt
            beta = float(attr_value(node, "beta", 1.0))
            if beta == 0:
                continue
            shift = shift / beta
        dtype = node.inputs[1].const_value.numpy().dtype
        _set_const(model.graph, node, 1, new_w.astype(dtype))
        _add_to_bias(model.graph, node, shift.astype(dtype))
        folded += len(cols)
    return ir.serde.serialize_model(model), folded


def _add_to_bias(graph: ir.Graph, node: ir.Node, shift: np.ndarray) -> None:
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = node.inputs[2].const_value.numpy()
        _set_const(graph, node, 2, (b.reshape(-1) + shift).reshape(b.shape) if b.size == shift.size
                   else b + shift.reshape((1, -1) if b.ndim == 2 else (-1,)))
        return
    name = f"{node.name or node.op_type}.folded_bias"
    value = ir.Value(name=name, shape=ir.Shape(shift.shape), type=ir.TensorType(node.inputs[1].dtype),
                     const_value=ir.tensor(np.ascontiguousarray(shift), name=name))
    graph.register_initializer(value)
    node.resize_inputs(3)
    node.replace_input_with(2, value)


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
        if attr_value(node, "transB", 0):
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
            c = const_array(v)
            if c is not None and c.size == len(kout) and c.size > 1:
                arr = v.const_value.numpy()
                shape = arr.shape
                axis = len(shape) - (len(y.shape) - 1)  # the channel axis, right-aligned
                _set_const(graph, node, i, np.compress(kout, arr, axis=axis))
        return 1
    return 0
