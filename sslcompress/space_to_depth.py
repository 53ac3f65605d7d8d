"""A strided convolution over a few channels written as SpaceToDepth and a stride-1 convolution: the same sums.

ORT's integer convolution on x86 gathers each output pixel's receptive field byte by byte: over a 3-channel
image (a stem: 7x7 stride 2 in ResNets, 3x3 stride 2 in MobileNets, 4x4 stride 4 patches in ConvNeXt) that
gather, not the multiply, is most of the time, so the INT8 stem gains little over float32 and weighs more in a
compact model (whose input channels SSL cannot cut) than in the dense one. Folding the stride into the channels
first (SpaceToDepth with the stride as block: 3 channels become 12 at half the size) makes the gather four times
coarser and the kernel stride 1; the kernel grows by the zeros that fill it to whole blocks.

Per spatial axis, for input length H (a multiple of the stride s), kernel K, pads (pb, pe) and output length Y:
the kernel is shifted by f = (-pb) mod s zeros at its front (so that the pad becomes whole blocks) and filled with
zeros at its end to K' = s * ceil((K + f) / s); then output y reads blocks y - P .. y - P + K'/s - 1 of the
folded input, P = (pb + f) / s, and the end pad is E = Y - H/s - P + K'/s - 1 (never negative where the rewrite
is taken). The folded weight's input channel (by * s + bx) * C + c is ONNX SpaceToDepth's order.

A pass: the model in, a new model out (or the same object where nothing qualifies); nothing is measured here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_names import fresh_name, value_shapes

# Input channels up to which the byte gather dominates ORT's integer kernel (measured on AVX-512 VNNI: the
# 3-channel 7x7/2 stem at 224x224 runs 1.3-1.6x faster folded, 32 or 64 filters).
MAX_INPUT_CHANNELS = 4


@dataclass(frozen=True)
class Folded:
    conv: str  # the rewritten Conv's name (or its output's, where it has none)
    block: int  # the stride folded into the channels
    kernel: tuple[int, int]  # the stride-1 kernel it became
    channels: int  # its input channels (the original's times block squared)


def strided_convs_as_space_to_depth(proto: onnx.ModelProto,
                                    max_channels: int = MAX_INPUT_CHANNELS) -> tuple[onnx.ModelProto, list[Folded]]:
    """A copy of the model with every qualifying Conv (2-D, one group, no dilation, the same stride s >= 2 on
    both axes, at most `max_channels` input channels, a constant weight, a known input size divisible by s)
    written as SpaceToDepth(s) and a stride-1 Conv, and what was folded; the model itself where none
    qualifies."""
    # An initializer that is also a graph input is a default the caller may replace: not a constant weight.
    inputs = {i.name for i in proto.graph.input}
    inits = {t.name: t for t in proto.graph.initializer if t.name not in inputs}
    shapes = value_shapes(proto)
    plans = {}
    for i, node in enumerate(proto.graph.node):
        plan = _plan(node, inits, shapes, max_channels)
        if plan is not None:
            plans[i] = plan
    if not plans:
        return proto, []
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    taken = {n for node in graph.node for n in (*node.input, *node.output, node.name)} | set(inits)
    nodes, folded = [], []
    for i, node in enumerate(proto.graph.node):
        if i not in plans:
            nodes.append(node)
            continue
        plan = plans[i]
        label = node.name or node.output[0]
        moved, weight = fresh_name(f"{label}.space_to_depth", taken), fresh_name(f"{label}.folded_weight", taken)
        graph.initializer.append(numpy_helper.from_array(plan.weight, weight))
        nodes.append(helper.make_node("SpaceToDepth", [node.input[0]], [moved], blocksize=plan.block,
                                      name=fresh_name(f"{label}/SpaceToDepth", taken)))
        nodes.append(helper.make_node("Conv", [moved, weight, *node.input[2:]], list(node.output), name=node.name,
                                      kernel_shape=list(plan.weight.shape[2:]), strides=[1, 1],
                                      pads=list(plan.pads)))
        folded.append(Folded(label, plan.block, tuple(plan.weight.shape[2:]), int(plan.weight.shape[1])))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used or t.name in inputs or t.name not in inits]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out, folded


@dataclass(frozen=True)
class _Plan:
    block: int
    weight: np.ndarray
    pads: tuple[int, int, int, int]


def _plan(node: onnx.NodeProto, inits: dict, shapes: dict, max_channels: int) -> _Plan | None:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    w = inits.get(node.input[1])
    x_shape = shapes.get(node.input[0])
    if w is None or x_shape is None or len(w.dims) != 4 or len(x_shape) != 4:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    strides = list(attrs.get("strides", [1, 1]))
    if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
        return None
    if len(strides) != 2 or strides[0] != strides[1] or strides[0] < 2:
        return None
    s = strides[0]
    m, c, kh, kw = w.dims
    sizes = x_shape[2:]
    if c > max_channels or x_shape[1] != c or kh * kw == 1:
        return None
    if any(not isinstance(n, int) or n <= 0 or n % s for n in sizes):
        return None
    pads = _pads(attrs, sizes, (kh, kw), s)
    if pads is None:
        return None
    axes = [_axis(n, k, s, pb, pe) for n, k, pb, pe in zip(sizes, (kh, kw), pads[:2], pads[2:])]
    if any(a is None for a in axes):
        return None
    (fh, kah, ph, eh), (fw, kaw, pw, ew) = axes
    weight = numpy_helper.to_array(w)
    full = np.zeros((m, c, kah * s, kaw * s), dtype=weight.dtype)
    full[:, :, fh:fh + kh, fw:fw + kw] = weight
    # (M, C, Ka, s, Kb, s) -> (M, s_y, s_x, C, Ka, Kb): SpaceToDepth's channel (by * s + bx) * C + c.
    folded = full.reshape(m, c, kah, s, kaw, s).transpose(0, 3, 5, 1, 2, 4).reshape(m, c * s * s, kah, kaw)
    return _Plan(s, np.ascontiguousarray(folded), (ph, pw, eh, ew))


def _axis(n: int, k: int, s: int, pb: int, pe: int) -> tuple[int, int, int, int] | None:
    """(front zeros f, folded kernel length, folded pad begin, folded pad end) of one axis, or None where the
    folded conv would need a negative end pad (the original stops reading before the input's last block)."""
    y = (n + pb + pe - k) // s + 1
    f = (-pb) % s
    ka = math.ceil((k + f) / s)
    p = (pb + f) // s
    e = y - n // s - p + ka - 1
    return None if e < 0 or y < 1 else (f, ka, p, e)


def _pads(attrs: dict, sizes, kernel, s: int) -> tuple[int, int, int, int] | None:
    """Explicit (top, left, bottom, right) pads, auto_pad resolved; None for a form not read here."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "NOTSET":
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        return tuple(pads) if len(pads) == 4 and min(pads) >= 0 else None
    if auto == "VALID":
        return (0, 0, 0, 0)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k in zip(sizes, kernel):
            total = max((math.ceil(n / s) - 1) * s + k - n, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else large)
            end.append(large if auto == "SAME_UPPER" else small)
        return (*begin, *end)
    return None


def quantize_before_space_to_depth(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of a quantized model in which every SpaceToDepth read by one per-tensor QuantizeLinear and nothing
    else moves behind it: QuantizeLinear(SpaceToDepth(x)) == SpaceToDepth(QuantizeLinear(x)) element for
    element (the one only moves what the other maps one by one), and the move shuffles a quarter of the bytes.
    Only where this ONNX Runtime has a uint8 SpaceToDepth kernel (newer releases); the model itself and 0
    where nothing moves."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in proto.graph.output}
    inits = {t.name: t for t in proto.graph.initializer}
    pairs = []
    for node in proto.graph.node:
        if node.op_type != "SpaceToDepth" or node.domain not in ("", "ai.onnx") or node.output[0] in outputs:
            continue
        readers = consumers.get(node.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            continue
        q = readers[0]
        scale, zero = inits.get(q.input[1]), inits.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        if scale is None or int(np.prod(scale.dims)) != 1:
            continue  # a per-axis quantization does not commute with moving channels
        if len(q.input) > 2 and q.input[2] and (zero is None or int(np.prod(zero.dims)) != 1
                                                 or zero.data_type != onnx.TensorProto.UINT8):
            continue
        pairs.append((node, q))
    if not pairs or not _uint8_space_to_depth():
        return proto, 0
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    by_name = {n.output[0]: n for n in out.graph.node}
    order = list(out.graph.node)
    taken = {n for node in out.graph.node for n in (*node.input, *node.output)}
    stale = set()
    for s2d, q in pairs:
        fold, quantize = by_name[s2d.output[0]], by_name[q.output[0]]
        x, quantized = fold.input[0], quantize.output[0]
        stale.add(fold.output[0])
        moved = fresh_name(f"{x}.quantized", taken)
        quantize.input[0], quantize.output[0] = x, moved
        fold.input[0], fold.output[0] = moved, quantized
        i, j = order.index(fold), order.index(quantize)
        order[i], order[j] = quantize, fold
    del out.graph.node[:]
    out.graph.node.extend(order)
    kept = [v for v in out.graph.value_info if v.name not in stale]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return out, len(pairs)


@functools.cache
def _uint8_space_to_depth() -> bool:
    """Whether ONNX Runtime's CPU provider runs SpaceToDepth on uint8 (added in 2026; older releases refuse
    the model at session creation)."""
    import onnxruntime as ort

    node = helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, [1, 4, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": np.arange(4, dtype=np.uint8).reshape(1, 1, 2, 2)})[0]
    except Exception:  # noqa: BLE001 - no kernel for uint8: ORT raises its NOT_IMPLEMENTED as a generic error
        return False
    return got.ravel().tolist() == [0, 1, 2, 3]
