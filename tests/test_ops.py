"""One test per op rule: a tiny graph written with onnx.helper, some groups zeroed, the surgery
run, the new structure asserted, and the outputs compared with ORT on the uncut model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sslcompress.surgery.compress import compress
from sslcompress.surgery.verify import compare

RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def _model(nodes, inits: dict[str, np.ndarray], x_shape, y_shape, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return onnx.shape_inference.infer_shapes(m, strict_mode=True)


def _compress(proto: onnx.ModelProto):
    res = compress(proto, shape_lowering="off")
    assert res.verification.passed, res.report["verification"]
    onnx.checker.check_model(res.model, full_check=True)
    again = compare(proto, res.model, n_random=2, seed=7)
    assert again.passed
    return res


def _dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {i.name: list(i.dims) for i in model.graph.initializer}


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_grouped_conv_loses_whole_groups_only():
    a = _w(8, 3, 1, 1)
    a[[2, 3]] = 0  # group 1 of the grouped conv reads only these: the group goes
    a[4] = 0  # half of group 2: the group stays whole
    g = _w(8, 2, 3, 3)
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Conv", ["t1", "g"], ["t2"], group=4, pads=[1, 1, 1, 1], name="g"),
             helper.make_node("Relu", ["t2"], ["t3"]),
             helper.make_node("Conv", ["t3", "c"], ["y"], name="c")]
    proto = _model(nodes, {"a": a, "g": g, "c": _w(5, 8, 1, 1)}, (2, 3, 6, 6), (2, 5, 6, 6))
    res = _compress(proto)
    d = _dims(res.model)
    assert d["a"] == [6, 3, 1, 1] and d["g"] == [6, 2, 3, 3] and d["c"] == [5, 6, 1, 1]
    conv = next(n for n in res.model.graph.node if n.name == "g")
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == 3


def test_depthwise_conv_with_channel_multiplier():
    a = _w(6, 3, 1, 1)
    a[[1, 4]] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Conv", ["t1", "dw", "dwb"], ["t2"], group=6, pads=[1, 1, 1, 1], name="dw"),
             helper.make_node("Conv", ["t2", "c"], ["y"], name="c")]
    dwb = np.zeros(12, np.float32)
    dwb[[0, 1, 6, 7]] = 0.3  # biases of live channels only: dead channels stay zero
    proto = _model(nodes, {"a": a, "dw": _w(12, 1, 3, 3), "dwb": dwb, "c": _w(4, 12, 1, 1)},
                   (2, 3, 5, 5), (2, 4, 5, 5))
    res = _compress(proto)
    d = _dims(res.model)
    assert d["a"] == [4, 3, 1, 1] and d["dw"] == [8, 1, 3, 3] and d["c"] == [4, 8, 1, 1]


def test_conv_transpose_reads_and_writes_channels():
    a = _w(6, 3, 3, 3)
    a[[0, 5]] = 0
    t = _w(6, 4, 2, 2)
    t[:, 2] = 0  # an output channel of the transposed conv that is all zero
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], pads=[1, 1, 1, 1], name="a"),
             helper.make_node("ConvTranspose", ["t1", "t"], ["t2"], strides=[2, 2], name="t"),
             helper.make_node("Relu", ["t2"], ["t3"]),
             helper.make_node("Conv", ["t3", "c"], ["y"], name="c")]
    proto = _model(nodes, {"a": a, "t": t, "c": _w(2, 4, 1, 1)}, (1, 3, 4, 4), (1, 2, 8, 8))
    res = _compress(proto)
    d = _dims(res.model)
    assert d["a"] == [4, 3, 3, 3] and d["t"] == [4, 3, 2, 2] and d["c"] == [2, 3, 1, 1]


def test_reshape_to_features_then_matmul_and_add():
    a = _w(4, 2, 3, 3)
    a[1] = 0
    m1 = _w(4 * 9, 6)
    m1[:, 3] = 0
    bias = _w(6)
    bias[3] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Reshape", ["t1", "shape"], ["t2"]),
             helper.make_node("MatMul", ["t2", "m1"], ["t3"], name="m1"),
             helper.make_node("Add", ["t3", "bias"], ["t4"]),
             helper.make_node("Relu", ["t4"], ["t5"]),
             helper.make_node("MatMul", ["t5", "m2"], ["y"], name="m2")]
    inits = {"a": a, "shape": np.array([2, -1], np.int64), "m1": m1, "bias": bias, "m2": _w(6, 3)}
    proto = _model(nodes, inits, (2, 2, 5, 5), (2, 3))
    res = _compress(proto)
    d = _dims(res.model)
    assert d["a"] == [3, 2, 3, 3] and d["m1"] == [27, 5] and d["bias"] == [5] and d["m2"] == [5, 3]
    assert list(numpy_helper.to_array(next(i for i in res.model.graph.initializer if i.name == "shape"))) == [2, -1]  # -1 fits the new count


def test_split_sizes_follow_the_kept_channels():
    a = _w(8, 3, 1, 1)
    a[[1, 5, 6]] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Split", ["t1", "sizes"], ["s1", "s2"], axis=1),
             helper.make_node("Conv", ["s1", "b"], ["u1"], name="b"),
             helper.make_node("Conv", ["s2", "c"], ["u2"], name="c"),
             helper.make_node("Add", ["u1", "u2"], ["y"])]
    inits = {"a": a, "sizes": np.array([3, 5], np.int64), "b": _w(2, 3, 1, 1), "c": _w(2, 5, 1, 1)}
    proto = _model(nodes, inits, (2, 3, 4, 4), (2, 2, 4, 4))
    res = _compress(proto)
    d = _dims(res.model)
    assert d["a"] == [5, 3, 1, 1] and d["b"] == [2, 2, 1, 1] and d["c"] == [2, 3, 1, 1]


def test_split_into_equal_parts_gets_explicit_sizes():
    a = _w(6, 3, 1, 1)
    a[4] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Split", ["t1"], ["s1", "s2"], axis=1, num_outputs=2),
             helper.make_node("Concat", ["s2", "s1"], ["t2"], axis=1),
             helper.make_node("Conv", ["t2", "c"], ["y"], name="c")]
    proto = _model(nodes, {"a": a, "c": _w(2, 6, 1, 1)}, (1, 3, 3, 3), (1, 2, 3, 3), opset=18)
    res = _compress(proto)
    assert _dims(res.model)["c"] == [2, 5, 1, 1]


@pytest.mark.parametrize("step", [1, 2])
def test_slice_on_the_channel_axis(step):
    a = _w(8, 3, 1, 1)
    a[[0, 3, 4]] = 0  # 0 is outside the slice; 3 and 4 inside
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Relu", ["t1"], ["t2"]),
             helper.make_node("Slice", ["t2", "starts", "ends", "axes", "steps"], ["t3"]),
             helper.make_node("Conv", ["t3", "c"], ["u"], name="c"),
             helper.make_node("Conv", ["t2", "d"], ["v"], name="d"),
             helper.make_node("Concat", ["u", "v"], ["y"], axis=1)]
    n_sel = len(range(8)[1:8:step])
    inits = {"a": a, "starts": np.array([1], np.int64), "ends": np.array([8], np.int64),
             "axes": np.array([1], np.int64), "steps": np.array([step], np.int64),
             "c": _w(2, n_sel, 1, 1), "d": _w(2, 8, 1, 1)}
    proto = _model(nodes, inits, (2, 3, 4, 4), (2, 4, 4, 4))
    res = _compress(proto)
    d = _dims(res.model)
    assert d["a"] == [5, 3, 1, 1] and d["d"] == [2, 5, 1, 1]
    assert d["c"][1] == len([i for i in range(8)[1:8:step] if i not in (0, 3, 4)])


def test_spatial_slice_and_pad_keep_channels_apart():
    a = _w(6, 3, 3, 3)
    a[2] = 0
    ab = _w(6)
    ab[2] = 0
    nodes = [helper.make_node("Conv", ["x", "a", "ab"], ["t1"], name="a"),
             helper.make_node("Pad", ["t1", "pads"], ["t2"], mode="reflect"),
             helper.make_node("Slice", ["t2", "starts", "ends", "axes"], ["t3"]),
             helper.make_node("Pad", ["t3", "pads"], ["t4"]),
             helper.make_node("Conv", ["t4", "c"], ["y"], name="c")]
    inits = {"a": a, "ab": ab, "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
             "starts": np.array([1], np.int64), "ends": np.array([5], np.int64), "axes": np.array([2], np.int64),
             "c": _w(3, 6, 3, 3)}
    proto = _model(nodes, inits, (1, 3, 6, 6), (1, 3, 4, 6))
    res = _compress(proto)
    assert _dims(res.model)["c"] == [3, 5, 3, 3]


def test_reflect_pad_keeps_a_constant_constant_and_it_folds():
    a = _w(4, 3, 1, 1)
    a[1] = 0
    ab = np.array([0, 0.4, 0, 0], np.float32)  # channel 1 is the constant 0.4
    nodes = [helper.make_node("Conv", ["x", "a", "ab"], ["t1"], name="a"),
             helper.make_node("Pad", ["t1", "pads"], ["t2"], mode="edge"),
             helper.make_node("Conv", ["t2", "c"], ["y"], name="c")]
    inits = {"a": a, "ab": ab, "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "c": _w(2, 4, 3, 3)}
    proto = _model(nodes, inits, (1, 3, 5, 5), (1, 2, 5, 5))
    res = _compress(proto)
    assert res.report["constant_channels_folded"] == 1
    assert _dims(res.model)["c"] == [2, 3, 3, 3]


def test_resize_sizes_follow_the_kept_channels():
    a = _w(5, 3, 1, 1)
    a[[0, 2]] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Resize", ["t1", "", "", "sizes"], ["t2"], mode="nearest"),
             helper.make_node("Conv", ["t2", "c"], ["y"], name="c")]
    inits = {"a": a, "sizes": np.array([1, 5, 8, 8], np.int64), "c": _w(2, 5, 1, 1)}
    proto = _model(nodes, inits, (1, 3, 4, 4), (1, 2, 8, 8))
    res = _compress(proto)
    d = _dims(res.model)
    assert d["a"] == [3, 3, 1, 1] and d["c"] == [2, 3, 1, 1]
    assert list(numpy_helper.to_array(next(i for i in res.model.graph.initializer if i.name == "sizes"))) == [1, 3, 8, 8]


def test_prelu_slope_is_sliced():
    a = _w(4, 3, 1, 1)
    a[2] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("PRelu", ["t1", "slope"], ["t2"]),
             helper.make_node("Conv", ["t2", "c"], ["y"], name="c")]
    inits = {"a": a, "slope": np.array([0.1, 0.2, 0.3, 0.4], np.float32).reshape(4, 1, 1), "c": _w(2, 4, 1, 1)}
    proto = _model(nodes, inits, (1, 3, 4, 4), (1, 2, 4, 4))
    res = _compress(proto)
    assert _dims(res.model)["slope"] == [3, 1, 1]


def test_lrn_across_channels_is_a_wall_and_says_so():
    a = _w(6, 3, 1, 1)
    a[2] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("LRN", ["t1"], ["t2"], size=3, name="norm"),
             helper.make_node("Conv", ["t2", "c"], ["y"], name="c")]
    proto = _model(nodes, {"a": a, "c": _w(2, 6, 1, 1)}, (1, 3, 4, 4), (1, 2, 4, 4))
    res = _compress(proto)
    assert _dims(res.model)["a"] == [6, 3, 1, 1]
    assert any(k.startswith("LRN norm") for k in res.report["blocked_by"])


def test_an_op_without_a_rule_is_a_wall_and_says_so():
    a = _w(6, 3, 1, 1)
    a[2] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Hardmax", ["t1"], ["t2"], axis=1, name="mix"),
             helper.make_node("Conv", ["t2", "c"], ["y"], name="c")]
    proto = _model(nodes, {"a": a, "c": _w(2, 6, 1, 1)}, (1, 3, 4, 4), (1, 2, 4, 4))
    res = _compress(proto)
    assert _dims(res.model)["a"] == [6, 3, 1, 1]
    assert "Hardmax mix (no rule for this op)" in res.report["blocked_by"]


def test_sum_of_three_tensors_couples_their_channels():
    ws = {k: _w(5, 3, 1, 1) for k in "abc"}
    for k in "abc":
        ws[k][3] = 0
    ws["a"][1] = 0  # channel 1 lives in b and c: it stays
    nodes = [helper.make_node("Conv", ["x", k], [f"t{k}"], name=k) for k in "abc"]
    nodes += [helper.make_node("Sum", ["ta", "tb", "tc"], ["s"]),
              helper.make_node("Conv", ["s", "d"], ["y"], name="d")]
    proto = _model(nodes, {**ws, "d": _w(2, 5, 1, 1)}, (1, 3, 4, 4), (1, 2, 4, 4))
    res = _compress(proto)
    d = _dims(res.model)
    assert d["a"] == d["b"] == d["c"] == [4, 3, 1, 1] and d["d"] == [2, 4, 1, 1]


def test_squeeze_excitation_gate_goes_with_its_channel():
    a = _w(8, 3, 3, 3)
    a[[1, 5]] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], pads=[1, 1, 1, 1], name="a"),
             helper.make_node("Relu", ["t1"], ["t2"]),
             helper.make_node("GlobalAveragePool", ["t2"], ["p"]),
             helper.make_node("Conv", ["p", "se1", "se1b"], ["q1"], name="se1"),
             helper.make_node("Relu", ["q1"], ["q2"]),
             helper.make_node("Conv", ["q2", "se2", "se2b"], ["q3"], name="se2"),
             helper.make_node("HardSigmoid", ["q3"], ["gate"]),
             helper.make_node("Mul", ["t2", "gate"], ["t3"]),
             helper.make_node("Conv", ["t3", "c"], ["y"], name="c")]
    inits = {"a": a, "se1": _w(2, 8, 1, 1), "se1b": _w(2), "se2": _w(8, 2, 1, 1), "se2b": _w(8), "c": _w(3, 8, 1, 1)}
    proto = _model(nodes, inits, (2, 3, 6, 6), (2, 3, 6, 6))
    res = _compress(proto)
    d = _dims(res.model)
    assert d["a"] == [6, 3, 3, 3] and d["se1"] == [2, 6, 1, 1] and d["se2"] == [6, 2, 1, 1]
    assert d["se2b"] == [6] and d["c"] == [3, 6, 1, 1]


@pytest.mark.parametrize("op,attrs", [("Sigmoid", {}), ("HardSigmoid", {"alpha": 0.3}), ("HardSwish", {}),
                                      ("Selu", {}), ("Elu", {}), ("Softplus", {}), ("Tanh", {}),
                                      ("LeakyRelu", {"alpha": 0.2}), ("Gelu", {})])
def test_activation_of_a_zero_channel_is_known_and_folds(op, attrs):
    """f(0) != 0 for many of these: the zero channel becomes a constant, folded into the next layer."""
    a = _w(4, 3, 1, 1)
    a[2] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node(op, ["t1"], ["t2"], **attrs),
             helper.make_node("Conv", ["t2", "c", "cb"], ["y"], name="c")]
    proto = _model(nodes, {"a": a, "c": _w(2, 4, 1, 1), "cb": _w(2)}, (1, 3, 4, 4), (1, 2, 4, 4),
                   opset=20 if op == "Gelu" else 17)
    res = _compress(proto)
    assert _dims(res.model)["a"] == [3, 3, 1, 1] and _dims(res.model)["c"] == [2, 3, 1, 1]


def test_the_surgery_guide_names_every_op_with_a_rule():
    import re
    from pathlib import Path

    from sslcompress.surgery.channels import handled_ops

    text = Path(__file__).resolve().parents[1].joinpath("docs", "surgery.md").read_text()
    para = text[text.index("Op types with a rule:"):].split("\n\n")[0]
    named = set(re.findall(r"[A-Za-z][A-Za-z0-9]*", para.replace("ReduceMax/Mean/Min/Sum", "ReduceMax ReduceMean ReduceMin ReduceSum")))
    missing = [op for op in handled_ops() if op not in named]  # whole words: "MaxPool" does not name "Max"
    assert not missing, f"docs/surgery.md does not name {missing}"


def test_constant_nodes_and_pow_let_a_within_channel_norm_through():
    """Caffe's within-channel LRN as exported: x / (1 + a * avgpool(x * x)) ** b, scalars as Constant nodes."""
    a = _w(6, 3, 3, 3)
    a[[1, 4]] = 0
    const = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(np.array(v, np.float32), n))
             for n, v in (("k_alpha", 1e-3), ("k_one", 1.0), ("k_beta", 0.75))]
    nodes = const + [
        helper.make_node("Conv", ["x", "a"], ["t1"], pads=[1, 1, 1, 1], name="a"),
        helper.make_node("Mul", ["t1", "t1"], ["sq"]),
        helper.make_node("AveragePool", ["sq"], ["avg"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["avg", "k_alpha"], ["sc"]),
        helper.make_node("Add", ["sc", "k_one"], ["den0"]),
        helper.make_node("Pow", ["den0", "k_beta"], ["den"]),
        helper.make_node("Div", ["t1", "den"], ["t2"]),
        helper.make_node("Conv", ["t2", "c"], ["y"], name="c")]
    proto = _model(nodes, {"a": a, "c": _w(2, 6, 1, 1)}, (1, 3, 5, 5), (1, 2, 5, 5))
    res = _compress(proto)
    assert _dims(res.model)["a"] == [4, 3, 3, 3] and _dims(res.model)["c"] == [2, 4, 1, 1]
    assert not res.report["blocked_by"]


def test_a_gemm_on_the_graph_input_reads_only_the_features_it_uses():
    """The paper's MLP drops input pixels: the input cannot lose channels, so a Gather selects them."""
    w1 = _w(20, 16)  # Gemm with transB: (out, in)
    w1[:, [0, 3, 7, 8]] = 0
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    w2 = _w(20, 3)
    w2[5] = 0
    proto = _model(nodes, {"w1": w1, "b1": _w(20), "w2": w2}, (2, 1, 4, 4), (2, 3))
    res = _compress(proto)
    d = _dims(res.model)
    assert d["w1"] == [19, 12] and d["w2"] == [19, 3]  # fc1's row 5 goes by pruning (nobody reads it)
    assert res.report["features_selected"] == {"fc1": [16, 12]}
    assert "Gather" in _ops(res.model)


@pytest.mark.parametrize("op", ["Log", "Reciprocal"])
def test_an_infinite_image_of_zero_stays_live(op):
    a = _w(4, 3, 1, 1)
    a[2] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Abs", ["t1"], ["t2"]),
             helper.make_node(op, ["t2"], ["t3"]),
             helper.make_node("Conv", ["t3", "c"], ["y"], name="c")]
    proto = _model(nodes, {"a": a, "c": _w(2, 4, 1, 1)}, (1, 3, 4, 4), (1, 2, 4, 4))
    import onnx_ir as ir

    from sslcompress.surgery.channels import LIVE, analyze
    states = {v.name: ch for v, ch in analyze(ir.serde.deserialize_model(proto)).items()}
    assert states["t2"].state[2] == 0 and states["t3"].state[2] == LIVE
