"""Quantized (QDQ) models: int8 weights behind DequantizeLinear read as the constants they are, zero
rows (int8 equal to the zero point) are ZERO channels, and the cut slices the int8 weight with its
per-channel scale and zero point (and int32 biases), so the compact model is still quantized and ONNX
Runtime, which fuses DQ -> Conv -> Q into integer kernels, computes exactly what it computed before.
What cannot be cut exactly declines, and the report says why (``blocked_by``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from sslcompress.runtime.sessions import create_session
from sslcompress.surgery.compress import compress
from sslcompress.surgery.measure import layers_of, quantized_weights
from sslcompress.surgery.verify import verification_level

RNG = np.random.default_rng(5)


def _w(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


class G:
    """A graph written node by node."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def const(self, name: str, a) -> str:
        self.inits.append(a if isinstance(a, onnx.TensorProto) else numpy_helper.from_array(np.asarray(a), name))
        return name

    def node(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name or f"{op}_{self.n}", **attrs))
        return out

    def qdq(self, x: str, scale, zp, axis: int | None = None, dtype=np.uint8, domain: str = "") -> str:
        s = self.const(f"{x}.s", np.asarray(scale, np.float32))
        z = self.const(f"{x}.zp", np.asarray(zp, dtype))
        kw = ({} if axis is None else {"axis": axis}) | ({"domain": domain} if domain else {})
        return self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, s, z], **kw), s, z], **kw)

    def qweight(self, name: str, w: np.ndarray, in_scale: float, bias: np.ndarray | None, axis: int = 0):
        """Symmetric per-channel int8 weight (zero rows stay zero), int32 bias at in_scale * weight scale."""
        red = tuple(i for i in range(w.ndim) if i != axis)
        peak = np.abs(w).max(axis=red)
        ws = np.where(peak > 0, peak / 127, 1.0).astype(np.float32)
        shape = [-1 if i == axis else 1 for i in range(w.ndim)]
        q = np.round(w / ws.reshape(shape)).astype(np.int8)
        wq = self.node("DequantizeLinear", [self.const(f"{name}.wq", q), self.const(f"{name}.ws", ws),
                                            self.const(f"{name}.wzp", np.zeros(len(ws), np.int8))], axis=axis)
        if bias is None:
            return wq, None
        bs = (ws * in_scale).astype(np.float32)
        b = self.node("DequantizeLinear", [self.const(f"{name}.bq", np.round(bias / bs).astype(np.int32)),
                                           self.const(f"{name}.bs", bs),
                                           self.const(f"{name}.bzp", np.zeros(len(ws), np.int32))], axis=0)
        return wq, b

    def model(self, x_shape, y: str, y_shape, opset: int = 13) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "y" if self.nodes[-1].output[0] == y else self.nodes[-1].output[0]
        graph = helper.make_graph(self.nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], self.inits)
        imports = [helper.make_opsetid("", opset)]
        if any(n.domain == "com.microsoft" for n in self.nodes):
            imports.append(helper.make_opsetid("com.microsoft", 1))
        m = helper.make_model(graph, opset_imports=imports)
        m.ir_version = 10 if opset >= 21 else 8
        onnx.checker.check_model(m, full_check=True)
        return onnx.shape_inference.infer_shapes(m)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    # Node by node, as verification runs a QDQ graph: ORT's fused int8 kernels saturate on CPUs without VNNI
    # (sslcompress.surgery.verify.verification_level).
    sess = create_session(model, threads=1, optimization=verification_level(model))
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _exact(proto: onnx.ModelProto, **kw):
    res = compress(proto, shape_lowering="off", **kw)
    assert res.verification.passed, res.report["verification"]
    onnx.checker.check_model(res.model, full_check=True)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    for seed in (21, 22):
        x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
        ref, got = _run(proto, x), _run(res.model, x)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * max(1e-6, float(np.abs(ref).max())))
    return res


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def _qdq_net(zp_in: int = 128, domain: str = "") -> onnx.ModelProto:
    """Q/DQ input -> conv c0 (int8, rows 1, 4 zero) -> Relu -> Q/DQ -> conv c1 (int8, rows 0, 7 zero)
    -> Relu -> Q/DQ -> GlobalAveragePool -> Flatten -> Q/DQ -> Gemm fc (int8, transB) -> y."""
    g = G()
    x = g.qdq("x", 0.05, zp_in, domain=domain)
    w0, b0 = _w(8, 3, 3, 3), _w(8)
    w0[[1, 4]], b0[[1, 4]] = 0, 0
    wq, bq = g.qweight("c0", w0, 0.05, b0)
    x = g.qdq(g.node("Relu", [g.node("Conv", [x, wq, bq], name="c0", pads=[1] * 4)]), 0.02, 0, domain=domain)
    w1, b1 = _w(8, 8, 3, 3), _w(8)
    w1[[0, 7]], b1[[0, 7]] = 0, 0
    wq, bq = g.qweight("c1", w1, 0.02, b1)
    x = g.qdq(g.node("Relu", [g.node("Conv", [x, wq, bq], name="c1", pads=[1] * 4)]), 0.02, 0, domain=domain)
    x = g.qdq(g.node("Flatten", [g.node("GlobalAveragePool", [x])]), 0.01, 0, domain=domain)
    wq, bq = g.qweight("fc", _w(10, 8), 0.01, _w(10))
    y = g.node("Gemm", [x, wq, bq], name="fc", transB=1)
    return g.model((2, 3, 8, 8), y, (2, 10))


def test_qdq_int8_per_channel_weights_and_int32_biases_are_cut_and_stay_quantized():
    proto = _qdq_net()
    work = ir.serde.deserialize_model(proto)
    assert quantized_weights(work) == 3 and all(lay.quantized for lay in layers_of(work))
    res = _exact(proto)
    d = _inits(res.model)
    assert d["c0.wq"].shape == (6, 3, 3, 3) and d["c0.wq"].dtype == np.int8
    assert d["c0.ws"].shape == (6,) and d["c0.wzp"].shape == (6,)
    assert d["c0.bq"].shape == (6,) and d["c0.bq"].dtype == np.int32 and d["c0.bs"].shape == (6,)
    assert d["c1.wq"].shape == (6, 6, 3, 3) and d["c1.ws"].shape == (6,) and d["c1.bq"].shape == (6,)
    assert d["fc.wq"].shape == (10, 6) and d["fc.ws"].shape == (10,)  # inputs cut, per-output scale kept
    # Every weight and bias is still int8/int32 behind a DequantizeLinear; nothing was dequantized.
    assert not any(a.dtype == np.float32 and a.ndim > 1 for a in d.values())
    assert _count(res.model, "DequantizeLinear") == _count(proto, "DequantizeLinear")
    assert res.report["totals"]["channels_removed"] == 4 and not res.report["blocked_by"]
    after = ir.serde.deserialize_model(res.model)
    assert quantized_weights(after) == 3


def test_the_zero_point_of_activations_keeps_zero_channels_zero():
    # An input zero point of 0 or 128, activations at zero point 0: a zero channel is q == zero point.
    res = _exact(_qdq_net(zp_in=0))
    assert res.report["totals"]["channels_removed"] == 4


def test_com_microsoft_quantize_dequantize_pass_channels_too():
    # ONNX's shape inference does not know com.microsoft ops: such a model carries its shapes
    # (value_info), as this one does from the inference of its ONNX-domain twin.
    proto = _qdq_net(domain="com.microsoft")
    twin = _qdq_net()
    proto.graph.ClearField("value_info")
    proto.graph.value_info.extend(twin.graph.value_info)
    res = _exact(proto)
    assert res.report["totals"]["channels_removed"] == 4 and not res.report["blocked_by"]
    assert any(n.domain == "com.microsoft" for n in res.model.graph.node)


def test_a_quantized_per_channel_constant_of_a_mul_is_sliced_and_stays_quantized():
    g = G()
    w0 = _w(6, 3, 1, 1)
    w0[[1, 4]] = 0
    wq, _ = g.qweight("a", w0, 0.05, None)
    x = g.qdq(g.node("Conv", [g.qdq("x", 0.05, 128), wq], name="a"), 0.03, 128)
    k = np.round(np.linspace(-100, 120, 6)).astype(np.int8).reshape(1, 6, 1, 1)
    kq = g.node("DequantizeLinear", [g.const("k.q", k), g.const("k.s", np.asarray(0.01, np.float32)),
                                     g.const("k.zp", np.asarray(0, np.int8))])
    x = g.qdq(g.node("Mul", [x, kq]), 0.03, 128)
    wq, _ = g.qweight("b", _w(4, 6, 1, 1), 0.03, None)
    y = g.node("Conv", [x, wq], name="b")
    res = _exact(g.model((1, 3, 5, 5), y, (1, 4, 5, 5)))
    d = _inits(res.model)
    assert d["a.wq"].shape == (4, 3, 1, 1) and d["b.wq"].shape == (4, 4, 1, 1)
    assert d["k.q"].dtype == np.int8 and np.array_equal(d["k.q"].reshape(-1), k.reshape(-1)[[0, 2, 3, 5]])


def test_a_constant_channel_of_a_quantized_layer_stays_unfolded():
    # A zero filter with a positive bias is a constant channel: folding it would move the next layer's
    # bias off its int32 grid, so it stays, and the zero filters without bias still go.
    g = G()
    w0, b0 = _w(6, 3, 3, 3), np.abs(_w(6)) + 0.5
    w0[[0, 2, 3]] = 0
    b0[[2, 3]] = 0
    wq, bq = g.qweight("a", w0, 0.05, b0)
    x = g.qdq(g.node("Relu", [g.node("Conv", [g.qdq("x", 0.05, 128), wq, bq], name="a", pads=[1] * 4)]), 0.02, 0)
    wq, bq = g.qweight("b", _w(4, 6, 3, 3), 0.02, _w(4))
    y = g.node("Conv", [x, wq, bq], name="b", pads=[1] * 4)
    res = _exact(g.model((1, 3, 6, 6), y, (1, 4, 6, 6)))
    d = _inits(res.model)
    assert d["a.wq"].shape == (4, 3, 3, 3) and d["b.wq"].shape == (4, 4, 3, 3)
    assert res.report["constant_channels_folded"] == 0


def test_an_asymmetric_activation_zero_point_still_cuts():
    # conv -> Q/DQ at zero point 100 (no Relu): a zero channel quantizes to 100 and dequantizes to 0.
    g = G()
    w0 = _w(6, 3, 1, 1)
    w0[[2, 3]] = 0
    wq, _ = g.qweight("a", w0, 0.05, None)
    x = g.qdq(g.node("Conv", [g.qdq("x", 0.05, 128), wq], name="a"), 0.03, 100)
    wq, _ = g.qweight("b", _w(4, 6, 1, 1), 0.03, None)
    y = g.node("Conv", [x, wq], name="b")
    res = _exact(g.model((2, 3, 5, 5), y, (2, 4, 5, 5)))
    d = _inits(res.model)
    assert d["a.wq"].shape == (4, 3, 1, 1) and d["b.wq"].shape == (4, 4, 1, 1)


def test_per_channel_activation_quantization_is_sliced_with_the_channels():
    g = G()
    w0 = _w(6, 3, 3, 3)
    w0[[0, 5]] = 0
    wq, _ = g.qweight("a", w0, 0.05, None)
    scales = np.linspace(0.01, 0.03, 6).astype(np.float32)
    zps = np.array([0, 3, 5, 7, 9, 11], np.uint8)
    x = g.qdq(g.node("Relu", [g.node("Conv", [g.qdq("x", 0.05, 128), wq], name="a", pads=[1] * 4)]),
              scales, zps, axis=1)
    wq, _ = g.qweight("b", _w(4, 6, 3, 3), 0.02, None)
    y = g.node("Conv", [x, wq], name="b", pads=[1] * 4)
    res = _exact(g.model((1, 3, 6, 6), y, (1, 4, 6, 6)))
    d = _inits(res.model)
    assert d["a.wq"].shape == (4, 3, 3, 3) and d["b.wq"].shape == (4, 4, 3, 3)
    kept = [s for s in d.values() if s.dtype == np.float32 and s.shape == (4,) and s.min() >= 0.01]
    assert any(np.array_equal(s, scales[1:5]) for s in kept)
    assert any(z.dtype == np.uint8 and np.array_equal(z, zps[1:5]) for z in d.values())


def test_a_grouped_qdq_conv_loses_channels_per_group():
    g = G()
    w0 = _w(8, 3, 1, 1)
    w0[[1, 6]] = 0  # one input channel of each group of the grouped conv
    wq, _ = g.qweight("a", w0, 0.05, None)
    x = g.qdq(g.node("Relu", [g.node("Conv", [g.qdq("x", 0.05, 128), wq], name="a")]), 0.02, 0)
    w1, b1 = _w(8, 4, 3, 3), _w(8)
    w1[[2, 5]], b1[[2, 5]] = 0, 0  # one filter of each group
    wq, bq = g.qweight("g", w1, 0.02, b1)
    x = g.qdq(g.node("Relu", [g.node("Conv", [x, wq, bq], name="g", group=2, pads=[1] * 4)]), 0.02, 0)
    wq, _ = g.qweight("c", _w(4, 8, 1, 1), 0.02, None)
    y = g.node("Conv", [x, wq], name="c")
    res = _exact(g.model((1, 3, 6, 6), y, (1, 4, 6, 6)))
    d = _inits(res.model)
    assert d["a.wq"].shape == (6, 3, 1, 1) and d["g.wq"].shape == (6, 3, 3, 3) and d["c.wq"].shape == (4, 6, 1, 1)
    assert d["g.ws"].shape == (6,) and d["g.bq"].shape == (6,)


def test_a_quantized_weight_shared_by_two_convs_is_cut_once_for_both():
    g = G()
    w0 = _w(6, 3, 1, 1)
    w0[[1, 2]] = 0
    wq, _ = g.qweight("a", w0, 0.05, None)
    x = g.qdq("x", 0.05, 128)
    left = g.node("Conv", [x, wq], name="left")
    right = g.node("Conv", [g.node("Relu", [x]), wq], name="right")
    s = g.node("Add", [left, right])
    wq2, _ = g.qweight("b", _w(4, 6, 1, 1), 0.05, None)
    y = g.node("Conv", [s, wq2], name="b")
    res = _exact(g.model((1, 3, 5, 5), y, (1, 4, 5, 5)))
    d = _inits(res.model)
    weights = [a for n, a in d.items() if n.startswith("a.wq")]
    # both convs lose the same filters: one int8 weight (and scale) serves both, as it did uncut
    assert len(weights) == 1 and weights[0].shape == (4, 3, 1, 1) and weights[0].dtype == np.int8
    assert len([n for n in d if n.startswith("a.ws")]) == 1
    assert d["b.wq"].shape == (4, 4, 1, 1)


def test_a_weight_quantized_at_run_time_from_a_float_constant_is_read_and_cut():
    # QuantizeLinear(float W) -> DequantizeLinear -> Conv, as fake-quantized exports write it.
    g = G()
    w0 = _w(6, 3, 3, 3)
    w0[[0, 3]] = 0
    ws = (np.abs(w0).reshape(6, -1).max(1) / 127 + 1e-3).astype(np.float32)
    s, z = g.const("ws", ws), g.const("wzp", np.zeros(6, np.int8))
    wq = g.node("DequantizeLinear", [g.node("QuantizeLinear", [g.const("w", w0), s, z], axis=0), s, z], axis=0)
    x = g.qdq(g.node("Relu", [g.node("Conv", [g.qdq("x", 0.05, 128), wq], name="a", pads=[1] * 4)]), 0.02, 0)
    wq2, _ = g.qweight("b", _w(4, 6, 1, 1), 0.02, None)
    y = g.node("Conv", [x, wq2], name="b")
    proto = g.model((1, 3, 6, 6), y, (1, 4, 6, 6))
    res = _exact(proto)
    d = _inits(res.model)
    assert d["w"].shape == (4, 3, 3, 3) and d["ws"].shape == (4,) and d["b.wq"].shape == (4, 4, 1, 1)
    assert _count(res.model, "QuantizeLinear") == _count(proto, "QuantizeLinear")


def test_a_kernel_shrinks_inside_the_quantized_weight():
    g = G()
    w0 = _w(4, 3, 3, 3)
    w0[:, :, 0, :] = 0  # the top row of every filter: 3x3 -> 2x3 with one row less of padding
    wq, _ = g.qweight("a", w0, 0.05, None)
    y = g.node("Conv", [g.qdq("x", 0.05, 128), wq], name="a", pads=[1] * 4)
    res = _exact(g.model((1, 3, 6, 6), y, (1, 4, 6, 6)))
    assert _inits(res.model)["a.wq"].shape == (4, 3, 2, 3) and _inits(res.model)["a.wq"].dtype == np.int8
    assert res.report["kernels_shrunk"] == {"a": [[3, 3], [2, 3]]}


def test_a_gemm_on_a_pinned_quantized_input_selects_the_quantized_features():
    # The graph input cannot lose features: the Gemm gathers the features it uses, on the quantized
    # tensor, so that DequantizeLinear -> Gemm stays together.
    g = G()
    w = _w(5, 12)
    w[:, [0, 3, 4]] = 0
    wq, bq = g.qweight("fc", w, 0.05, _w(5))
    y = g.node("Gemm", [g.qdq("x", 0.05, 128), wq, bq], name="fc", transB=1)
    res = _exact(g.model((3, 12), y, (3, 5)))
    assert _inits(res.model)["fc.wq"].shape == (5, 9) and res.report["features_selected"] == {"fc": [12, 9]}
    gather = next(n for n in res.model.graph.node if n.op_type == "Gather")
    reader = next(n for n in res.model.graph.node if gather.output[0] in n.input)
    assert reader.op_type == "DequantizeLinear"


def test_take_const_keeps_quantization_where_the_pick_follows_its_axis_and_dequantizes_elsewhere():
    from sslcompress.surgery.ops.base import const_tensor, take_const

    def net(axis: int) -> ir.Model:
        g = G()
        wq, _ = g.qweight("a", _w(4, 2, 1, 1), 0.05, None, axis=axis)
        g.node("Conv", ["x", wq], name="a", group=2)
        return ir.serde.deserialize_model(g.model((1, 4, 3, 3), g.nodes[-1].output[0], (1, 4, 3, 3)))

    def pick(a):  # rows 0, 1, 3 and, per group, other columns: along axis 0 only
        return np.concatenate([a[[0, 1]][:, [1]], a[[3]][:, [0]]], axis=0)

    for axis, stays in ((0, True), (1, False)):
        model = net(axis)
        conv = next(n for n in model.graph if n.op_type == "Conv")
        want = pick(np.asarray(const_tensor(conv.inputs[1])))
        take_const(model.graph, conv, 1, pick)
        assert np.array_equal(const_tensor(conv.inputs[1]), want)
        assert (conv.inputs[1].producer() is not None) == stays  # else a float initializer ...
        assert any(n.op_type == "DequantizeLinear" for n in model.graph) == stays  # ... and no orphan DQ


# ---- What cannot be cut exactly says why.

def test_a_per_channel_scale_on_another_axis_declines():
    g = G()
    w0 = _w(6, 3, 1, 1)
    w0[[2]] = 0
    x = g.qdq(g.node("Conv", ["x", g.const("a", w0)], name="a"), np.full(5, 0.02), np.zeros(5), axis=2)
    y = g.node("Conv", [x, g.const("b", _w(4, 6, 1, 1))], name="b")
    res = _exact(g.model((1, 3, 5, 5), y, (1, 4, 5, 5)))
    assert _inits(res.model)["a"].shape == (6, 3, 1, 1)
    assert any("per-channel scale runs along axis 2, not the channel axis 1" in k for k in res.report["blocked_by"])


def _low_bit_weight(g: G, name: str, w: np.ndarray, elem: int, **dq_attrs) -> str:
    q = np.clip(np.round(w / 0.1), -8, 7).astype(np.int8)
    t = helper.make_tensor(f"{name}.wq", elem, q.shape, q.reshape(-1).tolist())
    block = dq_attrs.get("block_size")
    s = np.full((w.shape[0], w.shape[1] // block, *w.shape[2:]) if block else w.shape[0], 0.1, np.float32)
    return g.node("DequantizeLinear", [g.const(f"{name}.wq", t), g.const(f"{name}.ws", s)],
                  axis=dq_attrs.pop("axis", 0), **dq_attrs)


@pytest.mark.parametrize(("elem", "attrs", "why"), [
    (TensorProto.INT4, {}, "its weight is quantized to INT4, which the surgery does not slice"),
    (TensorProto.INT8, {"axis": 1, "block_size": 2}, "its weight is block-quantized (block_size 2)"),
])
def test_int4_and_blocked_weights_decline_and_say_why(elem, attrs, why):
    g = G()
    w0 = _w(6, 4, 1, 1)
    w0[[1, 2]] = 0
    wq = _low_bit_weight(g, "a", w0, elem, **attrs)
    x = g.node("Relu", [g.node("Conv", [g.qdq("x", 0.05, 128), wq], name="a")])
    y = g.node("Conv", [x, g.const("b", _w(4, 6, 1, 1))], name="b")
    try:
        proto = g.model((1, 4, 5, 5), y, (1, 4, 5, 5), opset=21)
        _run(proto, np.zeros((1, 4, 5, 5), np.float32))
    except Exception as exc:  # pragma: no cover - an ORT without int4 / blocked DequantizeLinear
        pytest.skip(f"ONNX Runtime cannot run it: {str(exc).splitlines()[0][:100]}")
    res = _exact(proto)
    assert _inits(res.model)["b"].shape == (4, 6, 1, 1)  # the zeros all stay ...
    assert any(why in k and k.startswith("Conv a") for k in res.report["blocked_by"]), res.report["blocked_by"]
    assert sum(res.report["blocked_by"].values()) >= 2  # ... and the report says why


def test_float8_activations_decline_and_say_why():
    g = G()
    w0 = _w(6, 3, 1, 1)
    w0[[0, 1]] = 0
    x = g.node("Conv", ["x", g.const("a", w0)], name="a")
    s = g.const("s8", np.asarray(0.05, np.float32))
    z = g.const("z8", helper.make_tensor("z8", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    x = g.node("DequantizeLinear", [g.node("QuantizeLinear", [x, s, z]), s, z])
    y = g.node("Conv", [x, g.const("b", _w(4, 6, 1, 1))], name="b")
    try:
        proto = g.model((1, 3, 5, 5), y, (1, 4, 5, 5), opset=19)
        _run(proto, np.zeros((1, 3, 5, 5), np.float32))
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"ONNX Runtime cannot run it: {str(exc).splitlines()[0][:100]}")
    res = _exact(proto)
    assert _inits(res.model)["a"].shape == (6, 3, 1, 1)
    assert any("quantizes to FLOAT8E4M3FN" in k for k in res.report["blocked_by"]), res.report["blocked_by"]


# ---- A model quantized by ONNX Runtime's own quantizer.

def test_a_model_quantized_by_onnxruntime_is_cut_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    quantization = pytest.importorskip("onnxruntime.quantization")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.fc = torch.nn.Linear(8 * 4 * 4, 5)

        def forward(self, x):
            x = torch.relu(self.c2(torch.relu(self.c1(x))))
            return self.fc(torch.nn.functional.max_pool2d(x, 2).flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for layer, rows in ((net.c1, [1, 5]), (net.c2, [2, 6])):  # one filter of each group of c2
            layer.weight[rows] = 0
            layer.bias[rows] = 0
    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(src), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["y"])

    class Batches(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantization.quantize_static(str(src), str(dst), Batches(), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True, weight_type=quantization.QuantType.QInt8,
                                 activation_type=quantization.QuantType.QUInt8)
    proto = onnx.load(str(dst))
    assert _count(proto, "DequantizeLinear") > 6
    res = _exact(proto)
    layers = {r["name"]: r for r in res.report["layers"]}
    c1 = next(r for n, r in layers.items() if "c1" in n)
    c2 = next(r for n, r in layers.items() if "c2" in n)
    fc = next(r for n, r in layers.items() if "fc" in n)
    assert c1["weight_after"] == [6, 3, 3, 3]  # every planted filter gone ...
    assert c2["weight_after"] == [6, 3, 3, 3]  # ... per group, with one input of each group
    assert fc["weight_after"] == [5, 6 * 16]
    assert res.report["totals"]["channels_removed"] == 4 and not res.report["zeros_kept"]
    ints = _inits(res.model)
    assert ints["c1.weight_quantized"].dtype == np.int8 and ints["c1.bias_quantized"].dtype == np.int32
    assert ints["c1.weight_scale"].shape == (6,) and ints["c2.bias_quantized"].shape == (6,)
