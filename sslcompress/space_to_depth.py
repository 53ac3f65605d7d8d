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

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

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
    shapes = _shapes(proto)
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
        moved, weight = _unique(f"{label}.space_to_depth", taken), _unique(f"{label}.folded_weight", taken)
        graph.initializer.append(numpy_helper.from_array(plan.weight, weight))
        nodes.append(helper.make_node("SpaceToDepth", [node.input[0]], [moved], blocksize=plan.block,
                                      name=_unique(f"{label}/SpaceToDepth", taken)))
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


def _shapes(proto: onnx.ModelProto) -> dict[str, tuple]:
    """Every value's shape shape inference can tell: ints where known, None for symbolic sizes."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - a model inference cannot read is left as it is
        return {}
    g = inferred.graph
    out = {}
    for v in (*g.input, *g.value_info, *g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return out


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}.{i}", i + 1
    taken.add(candidate)
    return candidate
