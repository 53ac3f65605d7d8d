"""Corpus entries written with onnx.helper: graph shapes other tools and hand-edits produce.

Weights are seeded random and nonzero except where planted; biases and per-channel constants
are zero exactly at the planted channels (so those stay exactly zero) and nonzero elsewhere.
Every docstring lists the weighted layers in graph order with what was planted.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import Entry

SIDE = 16
F32 = TensorProto.FLOAT


class Graph:
    """A small builder: initializers by value, nodes in order, fresh value names."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, name: str | None = None, **attrs) -> str | list[str]:
        self.n += 1
        outs = [f"{op.lower()}{self.n}" + (f"_{i}" if n_out > 1 else "") for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name or f"{op}_{self.n}", **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, shape: tuple[int, ...], zero_out: tuple[int, ...] = (), axis: int = 0) -> np.ndarray:
        w = (self.rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) if axis == 0 else shape[0]))
        w = w.astype(np.float32)
        idx = [slice(None)] * len(shape)
        idx[axis] = list(zero_out)
        w[tuple(idx)] = 0
        return w

    def vec(self, n: int, zero: tuple[int, ...] = (), lo: float = 0.05, hi: float = 0.3) -> np.ndarray:
        v = (self.rng.uniform(lo, hi, n) * self.rng.choice([-1, 1], n)).astype(np.float32)
        v[list(zero)] = 0
        return v

    def conv(self, x: str, name: str, cout: int, cin: int, k: int, zero: tuple[int, ...] = (), *, bias: bool = True,
             pad: int | None = None, stride: int = 1, group: int = 1) -> str:
        pad = k // 2 if pad is None else pad
        ins = [x, self.const(f"{name}.weight", self.weight((cout, cin // group, k, k), zero))]
        if bias:
            ins.append(self.const(f"{name}.bias", self.vec(cout, zero)))
        return self.node("Conv", ins, name=name, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2,
                         group=group)

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], opset: int = 17,
              ir_version: int | None = None, inits_as_inputs: bool = False) -> onnx.ModelProto:
        graph_inputs = list(inputs)
        if inits_as_inputs:
            graph_inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        g = helper.make_graph(self.nodes, "corpus", graph_inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="corpus")
        if ir_version is not None:
            m.ir_version = ir_version
        onnx.checker.check_model(m, full_check=True)
        return m


def _image(name: str = "input", batch: int | str = 1) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F32, [batch, 3, SIDE, SIDE])


def _out(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F32, shape)


def _head(g: Graph, x: str) -> str:
    return g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)


def _rename_output(g: Graph, value: str, name: str = "output") -> None:
    for node in g.nodes:
        node.output[:] = [name if o == value else o for o in node.output]
        node.input[:] = [name if i == value else i for i in node.input]


# ---------------------------------------------------------------- entries


def nhwc() -> Entry:
    """A channels-last stretch, as TF converters write it:

        0 conv c0 3->8 (NCHW)                  planted: 2, 5
          Relu, Transpose to NHWC, Mul by a per-channel scale, Add a per-channel shift, LeakyRelu
        1 MatMul 8->12 + Add bias (a 1x1 conv channels-last)   planted: columns 1, 7, 10
          Relu, Transpose back to NCHW
        2 conv c2 12->4 (1x1), GlobalAveragePool, Flatten
    """
    g = Graph(10)
    x = g.node("Relu", [g.conv("input", "c0", 8, 3, 3, (2, 5))])
    x = g.node("Transpose", [x], perm=[0, 2, 3, 1])
    x = g.node("Mul", [x, g.const("scale", g.vec(8, (), 0.5, 1.5))])
    x = g.node("Add", [x, g.const("shift", g.vec(8, (2, 5)))])
    x = g.node("LeakyRelu", [x], alpha=0.1)
    x = g.node("MatMul", [x, g.const("pw.weight", g.weight((8, 12), (1, 7, 10), axis=1))], name="pw")
    x = g.node("Add", [x, g.const("pw.bias", g.vec(12, (1, 7, 10)))])
    x = g.node("Transpose", [g.node("Relu", [x])], perm=[0, 3, 1, 2])
    y = _head(g, g.conv(x, "c2", 4, 12, 1))
    _rename_output(g, y)
    m = g.model([_image()], [_out("output", [1, 4])])
    return Entry("nhwc", m, {0: (2, 5), 1: (1, 7, 10)}, {0: 6, 1: 9, 2: 4}, {1: 6, 2: 9})


def _q(g: Graph, x: str, scale: float, zp: int, dtype=np.uint8) -> str:
    s, z = g.const(f"{x}.s", np.array(scale, np.float32)), g.const(f"{x}.zp", np.array(zp, dtype))
    return g.node("DequantizeLinear", [g.node("QuantizeLinear", [x, s, z]), s, z])


def _qweight(g: Graph, name: str, w: np.ndarray, in_scale: float, bias: np.ndarray | None) -> tuple[str, str | None]:
    """Symmetric per-channel int8 weight behind DequantizeLinear (zero rows stay zero rows),
    and an int32 bias at scale in_scale * weight scale, as ONNX Runtime's quantizer writes them."""
    flat = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    ws = np.where(flat > 0, flat / 127, 1.0).astype(np.float32)
    q = np.round(w / ws.reshape(-1, *[1] * (w.ndim - 1))).astype(np.int8)
    wq = g.node("DequantizeLinear", [g.const(f"{name}.weight_q", q), g.const(f"{name}.weight_s", ws),
                                     g.const(f"{name}.weight_zp", np.zeros(w.shape[0], np.int8))], axis=0)
    if bias is None:
        return wq, None
    bs = (ws * in_scale).astype(np.float32)
    bq = np.round(bias / bs).astype(np.int32)
    b = g.node("DequantizeLinear", [g.const(f"{name}.bias_q", bq), g.const(f"{name}.bias_s", bs),
                                    g.const(f"{name}.bias_zp", np.zeros(w.shape[0], np.int32))], axis=0)
    return wq, b


def qdq() -> Entry:
    """A QDQ int8 model: QuantizeLinear/DequantizeLinear around activations, int8 weights with
    per-channel scales and zero points behind DequantizeLinear, int32 biases.

        0 conv c0 3->8                         planted: int8 rows 1, 4 (and their biases)
        1 conv c1 8->8                         planted: int8 rows 0, 7
        2 Gemm fc 8->10 (after GlobalAveragePool, Flatten)
    """
    g = Graph(11)
    x = _q(g, "input", 0.05, 128)
    w, b = _qweight(g, "c0", g.weight((8, 3, 3, 3), (1, 4)), 0.05, g.vec(8, (1, 4)))
    x = _q(g, g.node("Relu", [g.node("Conv", [x, w, b], name="c0", kernel_shape=[3, 3], pads=[1] * 4)]), 0.02, 0)
    w, b = _qweight(g, "c1", g.weight((8, 8, 3, 3), (0, 7)), 0.02, g.vec(8, (0, 7)))
    x = _q(g, g.node("Relu", [g.node("Conv", [x, w, b], name="c1", kernel_shape=[3, 3], pads=[1] * 4)]), 0.02, 0)
    x = _q(g, _head(g, x), 0.01, 0)
    w, _ = _qweight(g, "fc", g.weight((10, 8)), 0.01, None)
    g.node("Gemm", [x, w, g.const("fc.bias", g.vec(10))], name="fc", transB=1)
    _rename_output(g, g.nodes[-1].output[0])
    m = g.model([_image()], [_out("output", [1, 10])], opset=13)
    return Entry("qdq", m, {0: (1, 4), 1: (0, 7)}, {0: 6, 1: 6, 2: 10}, {1: 6, 2: 6})


def runtime_reshape() -> Entry:
    """A flatten written as Reshape to a target built at run time: Shape -> Gather(0) ->
    Unsqueeze -> Concat with [-1] (dynamic batch).

        0 conv c0 3->8 /2                      planted: 3, 6
        1 Gemm fc 512->10 on the reshaped (N, 8*8*8)   loses 2 x 64 features
    """
    g = Graph(12)
    x = g.node("Relu", [g.conv("input", "c0", 8, 3, 3, (3, 6), stride=2)])
    n = g.node("Gather", [g.node("Shape", [x]), g.const("zero", np.array(0, np.int64))], axis=0)
    n = g.node("Unsqueeze", [n, g.const("axes0", np.array([0], np.int64))])
    target = g.node("Concat", [n, g.const("minus1", np.array([-1], np.int64))], axis=0)
    x = g.node("Reshape", [x, target])
    g.node("Gemm", [x, g.const("fc.weight", g.weight((10, 512))), g.const("fc.bias", g.vec(10))], name="fc", transB=1)
    _rename_output(g, g.nodes[-1].output[0])
    m = g.model([_image(batch="N")], [_out("output", ["N", 10])])
    return Entry("runtime-reshape", m, {0: (3, 6)}, {0: 6, 1: 10}, {1: 6 * 64})


def se_expand() -> Entry:
    """A squeeze-excitation gate broadcast with Expand to Shape(x) before the Mul.

        0 conv c0 3->8                         planted: 1, 6
        1 conv down 8->2 (1x1 on the pooled x)
        2 conv up 2->8 (1x1) + Sigmoid         the gate of the zero channels: no one needs it (derived: 6)
        3 conv c3 8->4 on x * gate, GlobalAveragePool, Flatten
    """
    g = Graph(13)
    x = g.node("Relu", [g.conv("input", "c0", 8, 3, 3, (1, 6))])
    s = g.node("Relu", [g.conv(g.node("GlobalAveragePool", [x]), "down", 2, 8, 1)])
    gate = g.node("Sigmoid", [g.conv(s, "up", 8, 2, 1)])
    gate = g.node("Expand", [gate, g.node("Shape", [x])])
    y = _head(g, g.node("Relu", [g.conv(g.node("Mul", [x, gate]), "c3", 4, 8, 3)]))
    _rename_output(g, y)
    m = g.model([_image()], [_out("output", [1, 4])])
    return Entry("se-expand", m, {0: (1, 6)}, {0: 6, 1: 2, 2: 6, 3: 4}, {1: 6, 3: 6})


def two_inputs() -> Entry:
    """Two graph inputs, each through its own conv, added.

        0 conv a 3->8 (input a)                planted: 2, 5
        1 conv b 3->8 (input b)                planted: 2, 5 (the same channels: the Add keeps them zero)
        2 conv c 8->4 (1x1) on relu(a + b), GlobalAveragePool, Flatten
    """
    g = Graph(14)
    a = g.conv("input_a", "a", 8, 3, 3, (2, 5))
    b = g.conv("input_b", "b", 8, 3, 3, (2, 5))
    y = _head(g, g.conv(g.node("Relu", [g.node("Add", [a, b])]), "c", 4, 8, 1))
    _rename_output(g, y)
    m = g.model([_image("input_a"), _image("input_b")], [_out("output", [1, 4])])
    return Entry("two-inputs", m, {0: (2, 5), 1: (2, 5)}, {0: 6, 1: 6, 2: 4}, {2: 6})


def topk_ties() -> Entry:
    """TopK over class scores with ties: zero score rows (and the ReLU's zeros) tie at 0, and TopK
    breaks ties by position, so the scores' channels are positions the output reads.

        0 conv c0 3->8                         planted: 1, 3
        1 Gemm fc 8->10 + Relu, then TopK k=5  planted: rows 2, 5, 7 (and bias), which must STAY:
                                               TopK's indices are their positions
    """
    g = Graph(15)
    x = _head(g, g.node("Relu", [g.conv("input", "c0", 8, 3, 3, (1, 3))]))
    x = g.node("Gemm", [x, g.const("fc.weight", g.weight((10, 8), (2, 5, 7))), g.const("fc.bias", g.vec(10, (2, 5, 7)))],
               name="fc", transB=1)
    scores = g.node("Relu", [x])
    g.nodes.append(helper.make_node("TopK", [scores, g.const("k", np.array([5], np.int64))], ["values", "indices"],
                                    name="topk", axis=1, largest=1, sorted=1))
    outs = [_out("values", [1, 5]), helper.make_tensor_value_info("indices", TensorProto.INT64, [1, 5])]
    m = g.model([_image()], outs)
    return Entry("topk-ties", m, {0: (1, 3), 1: (2, 5, 7)}, {0: 6, 1: 10}, {1: 6},
                 note="layer 1's zero rows are pinned by TopK's indices")


def ir3_initializers_as_inputs() -> Entry:
    """IR version 3 (opset 8): every initializer is also listed as a graph input, plus a leftover
    initializer input no node reads; the BN's output is scaled and shifted per channel by
    constants Unsqueezed to (C, 1, 1).

        0 conv c0 3->8 + BN, * scale, + shift  planted: 0, 6 (conv rows, BN gamma and beta, shift)
        1 conv c1 8->8                         planted: 3
        2 Gemm fc 8->10 (after GlobalAveragePool, Flatten)
    """
    g = Graph(16)
    x = g.conv("input", "c0", 8, 3, 3, (0, 6), bias=False)
    bn = [g.const("bn.gamma", g.vec(8, (0, 6), 0.5, 1.5)), g.const("bn.beta", g.vec(8, (0, 6))),
          g.const("bn.mean", g.rng.uniform(-0.5, 0.5, 8).astype(np.float32)),
          g.const("bn.var", g.rng.uniform(0.5, 1.5, 8).astype(np.float32))]
    x = g.node("BatchNormalization", [x, *bn], epsilon=1e-5)
    x = g.node("Mul", [x, g.node("Unsqueeze", [g.const("scale", g.vec(8, (), 0.5, 1.5))], axes=[1, 2])])
    x = g.node("Add", [x, g.node("Unsqueeze", [g.const("shift", g.vec(8, (0, 6)))], axes=[1, 2])])
    x = g.node("Relu", [g.conv(g.node("Relu", [x]), "c1", 8, 8, 3, (3,))])
    g.node("Gemm", [_head(g, x), g.const("fc.weight", g.weight((10, 8))), g.const("fc.bias", g.vec(10))],
           name="fc", transB=1)
    _rename_output(g, g.nodes[-1].output[0])
    g.const("bn.num_batches_tracked", np.array(1000, np.int64))  # read by no node
    m = g.model([_image()], [_out("output", [1, 10])], opset=8, ir_version=3, inits_as_inputs=True)
    return Entry("ir3-initializers-as-inputs", m, {0: (0, 6), 1: (3,)}, {0: 6, 1: 7, 2: 10}, {1: 6, 2: 7})


def grouped_conv() -> Entry:
    """A grouped conv (group=2) where every group loses the same number of channels.

        0 conv c0 3->8                         planted: 2, 6 (one input channel of each group of 1)
        1 conv g 8->8, group 2                 planted: filters 1, 5 (one of each group)
        2 conv c2 8->4 (1x1), GlobalAveragePool, Flatten
    """
    g = Graph(17)
    x = g.node("Relu", [g.conv("input", "c0", 8, 3, 3, (2, 6))])
    x = g.node("Relu", [g.conv(x, "g", 8, 8, 3, (1, 5), group=2)])
    y = _head(g, g.conv(x, "c2", 4, 8, 1))
    _rename_output(g, y)
    m = g.model([_image()], [_out("output", [1, 4])])
    return Entry("grouped-conv", m, {0: (2, 6), 1: (1, 5)}, {0: 6, 1: 6, 2: 4}, {1: 6, 2: 6})


ALL = (nhwc, qdq, runtime_reshape, se_expand, two_inputs, topk_ties, ir3_initializers_as_inputs, grouped_conv)
