"""Convs with zero weight columns, and the explicit im2col + MatMul they can become.

``find_candidates`` (an analysis) lists the group-1 Convs whose weight, as a GEMM matrix (filters x
C*kh*kw columns), has zero columns, with static spatial sizes; ``replace_conv`` (a rewrite) puts in
their place a Pad, per kernel offset a strided Slice of the padded input and a Gather of the channels
kept there, a Concat and one MatMul with the compact weight, which computes the same output (the
same products, summed in another order). ``single_op_model`` builds one candidate alone, dense or
lowered, for timing. Which candidates to lower is lowering.py's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir


@dataclass(frozen=True, eq=False)
class Candidate:
    name: str  # the node's name, else its output's
    output: str  # the Conv's output value name: a node's key that survives (de)serialisation
    weight: np.ndarray  # (M, C, kh, kw)
    bias: np.ndarray | None  # (M,)
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    strides: tuple[int, int]
    dilations: tuple[int, int]
    input_shape: tuple[int | str | None, int, int, int]  # batch may be symbolic
    keep: np.ndarray  # bool (C, kh, kw): columns nonzero in some filter

    @property
    def out_hw(self) -> tuple[int, int]:
        (_, _, h, w), (kh, kw) = self.input_shape, self.weight.shape[2:]
        t, left, b, r = self.pads
        return ((h + t + b - self.dilations[0] * (kh - 1) - 1) // self.strides[0] + 1,
                (w + left + r - self.dilations[1] * (kw - 1) - 1) // self.strides[1] + 1)

    @property
    def macs(self) -> tuple[int, int]:
        spatial = self.out_hw[0] * self.out_hw[1]
        return int(self.weight.size) * spatial, int(self.weight.shape[0] * self.keep.sum()) * spatial

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.keep.sum()) / self.keep.size



def find_candidates(model: ir.Model | onnx.ModelProto, keep_zero_channels: bool = False) -> list[Candidate]:
    """Group-1 Convs with constant weights, static input shapes and some (not all) zero columns.

    Shapes are read from the values; only where a qualifying Conv's input has none does shape
    inference run (and then writes what it found onto the model's values). With ``keep_zero_channels``,
    the columns of an input channel that is zero in every column count as kept: a cut aligned to a
    channel step left such channels on purpose, and lowering them away would undo it.
    """
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    if model_opset(model) < 11:  # Pad with a pads input
        return []
    found = []
    for node in model.graph:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        if node.inputs[0] is None or not node.outputs or not node.outputs[0].name:
            continue
        group = node.attributes.get_int("group", 1)
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        if group != 1 or auto_pad != "NOTSET":
            continue
        w = _constant(node.inputs[1])
        b_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = _constant(b_value) if b_value is not None else None
        if w is None or w.ndim != 4 or (b_value is not None and bias is None):
            continue
        keep = np.any(w != 0, axis=0)
        if keep_zero_channels:
            keep[~keep.any(axis=(1, 2))] = True
        if keep.all() or not keep.any():
            continue
        found.append((node, w, None if bias is None else bias.reshape(-1), keep))
    if not found:
        return []
    if any(_static_shape(node.inputs[0]) is None or _static_shape(node.inputs[0])[1] != w.shape[1]
           for node, w, *_ in found):
        from onnx_ir.passes.common.shape_inference import ShapeInferencePass

        ShapeInferencePass(strict_mode=False)(model)
    out = []
    for node, w, bias, keep in found:
        shape = _static_shape(node.inputs[0])
        if shape is None or shape[1] != w.shape[1]:
            continue
        pads = tuple(node.attributes.get_ints("pads", (0, 0, 0, 0)))
        cand = Candidate(
            name=node.name or node.outputs[0].name, output=node.outputs[0].name, weight=w, bias=bias,
            pads=(pads[0], pads[1], pads[2], pads[3]),
            strides=tuple(node.attributes.get_ints("strides", (1, 1))),
            dilations=tuple(node.attributes.get_ints("dilations", (1, 1))),
            input_shape=shape, keep=keep,
        )
        if min(cand.out_hw) > 0:
            out.append(cand)
    return out


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant array (an initializer or a Constant node's), None if it is not constant."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _static_shape(value: ir.Value) -> tuple[int | str | None, int, int, int] | None:
    """(batch, C, H, W) with C, H, W known; the batch may be symbolic."""
    shape = value.shape
    if shape is None or len(shape) != 4:
        return None
    dims = [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in shape]
    if not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        return None
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else (dims[0] if isinstance(dims[0], str) else None)
    return batch, dims[1], dims[2], dims[3]


def model_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def _lowered_nodes(cand: Candidate, x: ir.Value, base: str) -> tuple[list[ir.Node], list[ir.Value], ir.Value]:
    """The im2col-of-kept-columns + MatMul subgraph reading ``x``: its nodes, initializers and output."""
    w = cand.weight
    m, _, kh, kw = w.shape
    ho, wo = cand.out_hw
    sh, sw = cand.strides
    dh, dw = cand.dilations
    dtype = ir.DataType.from_numpy(w.dtype)
    batch = cand.input_shape[0]
    nodes: list[ir.Node] = []
    inits: list[ir.Value] = []
    shared: dict[tuple, ir.Value] = {}  # small int64 constants repeat (axes, steps): one initializer each

    def const(suffix: str, arr: np.ndarray) -> ir.Value:
        arr = np.ascontiguousarray(arr)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.dtype == np.int64 else None
        if key in shared:
            return shared[key]
        name = f"{base}.{suffix}"
        v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     const_value=ir.tensor(arr, name=name))
        inits.append(v)
        if key is not None:
            shared[key] = v
        return v

    def node(op: str, suffix: str, inputs: list[ir.Value], shape: tuple, **attrs: Any) -> ir.Value:
        n = ir.Node("", op, inputs, [ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                    name=f"{base}.{suffix}" if suffix else base, num_outputs=1)
        n.outputs[0].name = f"{base}.{suffix or 'out'}"
        n.outputs[0].type = ir.TensorType(dtype)
        n.outputs[0].shape = ir.Shape(shape)
        nodes.append(n)
        return n.outputs[0]

    top, left, bottom, right = cand.pads
    c, h, wd = cand.input_shape[1:]
    if any(cand.pads):
        i64 = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
        x = node("Pad", "pad", [x, const("pads", i64)], (batch, c, h + top + bottom, wd + left + right))
    pieces, columns = [], []
    for i in range(kh):
        for j in range(kw):
            chans = np.flatnonzero(cand.keep[:, i, j])
            if not chans.size:
                continue
            starts, ends, axes = [i * dh, j * dw], [i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1], [2, 3]
            steps = [sh, sw]
            contiguous = chans[-1] - chans[0] + 1 == chans.size
            if contiguous and chans.size < c:  # a channel range slices along with the window
                starts, ends, axes, steps = [chans[0], *starts], [chans[-1] + 1, *ends], [1, *axes], [1, *steps]
            k = f"{i}_{j}"
            ins = [x, const(f"slice_{k}_starts", np.array(starts, np.int64)),
                   const(f"slice_{k}_ends", np.array(ends, np.int64)),
                   const("slice_axes_" + "".join(map(str, axes)), np.array(axes, np.int64)),
                   const("slice_steps_" + "_".join(map(str, steps)), np.array(steps, np.int64))]
            n_ch = chans.size if contiguous else c
            piece = node("Slice", f"slice_{k}", ins, (batch, n_ch, ho, wo))
            if not contiguous:
                piece = node("Gather", f"gather_{k}", [piece, const(f"gather_{k}_idx", chans.astype(np.int64))],
                             (batch, chans.size, ho, wo), axis=1)
            pieces.append(piece)
            columns.append(w[:, chans, i, j])
    compact = np.concatenate(columns, axis=1)  # (M, K) in the Concat's order
    k_cols = compact.shape[1]
    cols = node("Concat", "im2col", pieces, (batch, k_cols, ho, wo), axis=1) if len(pieces) > 1 else pieces[0]
    cols = node("Reshape", "cols", [cols, const("cols_shape", np.array([0, k_cols, ho * wo], np.int64))],
                (batch, k_cols, ho * wo))
    y = node("MatMul", "", [const("weight", compact), cols], (batch, m, ho * wo))
    if cand.bias is not None:
        y = node("Add", "bias_add", [y, const("bias", cand.bias.reshape(m, 1).astype(w.dtype))], (batch, m, ho * wo))
    y = node("Reshape", "reshape", [y, const("out_shape", np.array([0, m, ho, wo], np.int64))], (batch, m, ho, wo))
    return nodes, inits, y


def replace_conv(graph: ir.Graph, conv: ir.Node, cand: Candidate, base: str) -> None:
    """The Conv's place in the graph, its output name included, taken by its lowered subgraph."""
    nodes, inits, y = _lowered_nodes(cand, conv.inputs[0], _free_prefix(graph, base))
    for n in nodes:  # the MatMul keeps the conv's name, so the report lines the two up
        if n.op_type == "MatMul":
            n.name = base
    for v in inits:
        graph.register_initializer(v)
    ir.convenience.replace_nodes_and_values(graph, conv, [conv], nodes, [conv.outputs[0]], [y])


def _free_prefix(graph: ir.Graph, base: str) -> str:
    """`base`, or `base.N`, such that no value or initializer of the graph is already named `prefix.*`."""
    taken = set(graph.initializers) | {v.name for v in graph.inputs} | {
        v.name for n in graph for v in n.outputs if v is not None and v.name}
    prefix, k = base, 0
    while any(t.startswith(prefix + ".") for t in taken):
        k += 1
        prefix = f"{base}.{k}"
    return prefix


def single_op_model(cand: Candidate, opset: int, ir_version: int, lowered: bool) -> bytes:
    """The candidate alone, dense or lowered, as a model of one input and one output."""
    shape = (1 if not isinstance(cand.input_shape[0], int) else cand.input_shape[0], *cand.input_shape[1:])
    dtype = ir.DataType.from_numpy(cand.weight.dtype)
    x = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(dtype))
    if lowered:
        nodes, inits, y = _lowered_nodes(cand, x, "conv")
    else:
        inits = [ir.Value(name="w", shape=ir.Shape(cand.weight.shape), type=ir.TensorType(dtype),
                          const_value=ir.tensor(cand.weight, name="w"))]
        if cand.bias is not None:
            inits.append(ir.Value(name="b", shape=ir.Shape(cand.bias.shape), type=ir.TensorType(dtype),
                                  const_value=ir.tensor(cand.bias, name="b")))
        attrs = {"kernel_shape": list(cand.weight.shape[2:]), "pads": list(cand.pads),
                 "strides": list(cand.strides), "dilations": list(cand.dilations)}
        conv = ir.Node("", "Conv", [x, *inits], [ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                       name="conv", num_outputs=1)
        nodes, y = [conv], conv.outputs[0]
        y.type = ir.TensorType(dtype)
    y.name = "y"
    graph = ir.Graph([x], [y], nodes=nodes, initializers=inits, opset_imports={"": opset})
    return ir.serde.serialize_model(ir.Model(graph, ir_version=ir_version)).SerializeToString()
