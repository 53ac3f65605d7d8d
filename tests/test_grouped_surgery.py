"""Grouped convs lose channels per group: every group keeps as many input and output channels as the
others (AlexNet's group=2 layers, ResNeXt), zero channels that fall unevenly are kept until the groups
are equal again, a group with nothing left goes whole, and the cut model computes what the uncut one
computed (the surgery's verification and an ORT run of our own)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sslcompress.surgery.compress import compress

RNG = np.random.default_rng(3)


def _w(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def _model(nodes, inits: dict[str, np.ndarray], x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return onnx.shape_inference.infer_shapes(m, strict_mode=True)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _exact(proto: onnx.ModelProto):
    res = compress(proto, shape_lowering="off")
    assert res.verification.passed, res.report["verification"]
    onnx.checker.check_model(res.model, full_check=True)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    for seed in (11, 12):
        x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
        ref, got = _run(proto, x), _run(res.model, x)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    return res


def _dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {i.name: list(i.dims) for i in model.graph.initializer}


def _group(model: onnx.ModelProto, name: str) -> int:
    node = next(n for n in model.graph.node if n.name == name)
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)


def _three(group: int, c: int, g_zero: list[int], a_zero: list[int] = (), bias: bool = False) -> onnx.ModelProto:
    """x -> Conv a (c filters) -> Relu -> grouped Conv g (c -> c, 3x3, pad 1) -> Relu -> Conv c (1x1) -> y."""
    a, g = _w(c, 3, 1, 1), _w(c, c // group, 3, 3)
    a[list(a_zero)] = 0
    g[list(g_zero)] = 0
    inits = {"a": a, "g": g, "c": _w(5, c, 1, 1)}
    g_inputs = ["t2", "g"]
    if bias:
        gb = _w(c)
        gb[list(g_zero)] = 0  # zero filters with zero bias: ZERO channels
        inits["gb"], g_inputs = gb, ["t2", "g", "gb"]
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Relu", ["t1"], ["t2"]),
             helper.make_node("Conv", g_inputs, ["t3"], group=group, pads=[1, 1, 1, 1], name="g"),
             helper.make_node("Relu", ["t3"], ["t4"]),
             helper.make_node("Conv", ["t4", "c"], ["y"], name="c")]
    return _model(nodes, inits, (2, 3, 6, 6), (2, 5, 6, 6))


def test_group2_equal_zero_filters_all_go_per_group():
    res = _exact(_three(2, 8, g_zero=[1, 6], bias=True))
    d = _dims(res.model)
    assert d["g"] == [6, 4, 3, 3] and d["gb"] == [6] and d["c"] == [5, 6, 1, 1] and d["a"] == [8, 3, 1, 1]
    assert _group(res.model, "g") == 2
    row = next(r for r in res.report["layers"] if r["name"] == "g")
    assert row["weight"] == [8, 4, 3, 3] and row["weight_after"] == [6, 4, 3, 3]
    assert res.report["totals"]["channels_removed"] == 2


def test_group4_equal_zero_filters_and_inputs_go_per_group():
    # Outputs 2, 4, 9, 15 (one in each group of 4) and inputs 1, 6, 8, 13 (one in each group).
    res = _exact(_three(4, 16, g_zero=[2, 4, 9, 15], a_zero=[1, 6, 8, 13]))
    d = _dims(res.model)
    assert d["a"] == [12, 3, 1, 1] and d["g"] == [12, 3, 3, 3] and d["c"] == [5, 12, 1, 1]
    assert _group(res.model, "g") == 4
    assert res.report["totals"]["channels_removed"] == 8


def test_unequal_zero_filters_keep_the_groups_equal():
    # Group 0 has one zero filter (1), group 1 two (5, 6): one of group 1's stays, and says why.
    res = _exact(_three(2, 8, g_zero=[1, 5, 6]))
    d = _dims(res.model)
    assert d["g"] == [6, 4, 3, 3] and d["c"] == [5, 6, 1, 1] and _group(res.model, "g") == 2
    assert res.report["zeros_kept"] == {"Conv g (keeps its 2 groups equal)": 1}
    w = numpy_helper.to_array(next(i for i in res.model.graph.initializer if i.name == "g"))
    assert int((np.abs(w).reshape(6, -1).sum(1) == 0).sum()) == 1  # the zero filter kept


def test_unequal_input_channels_keep_the_groups_equal():
    # The grouped conv's inputs: group 0 loses 0, group 1 loses 4 and 5: one of 4, 5 stays.
    res = _exact(_three(2, 8, g_zero=[], a_zero=[0, 4, 5]))
    d = _dims(res.model)
    assert d["a"] == [6, 3, 1, 1] and d["g"] == [8, 3, 3, 3] and _group(res.model, "g") == 2


def test_an_input_channel_goes_when_no_filter_of_its_group_reads_it():
    # Nothing is zero but the grouped conv's fibres of inputs 2 and 7: a's filters 2 and 7 go with them.
    proto = _three(2, 8, g_zero=[])
    g = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "g")).copy()
    g[0:4, 2] = 0  # local input 2 of group 0 = channel 2
    g[4:8, 3] = 0  # local input 3 of group 1 = channel 7
    proto.graph.initializer.remove(next(i for i in proto.graph.initializer if i.name == "g"))
    proto.graph.initializer.append(numpy_helper.from_array(g, "g"))
    res = _exact(proto)
    d = _dims(res.model)
    assert d["a"] == [6, 3, 1, 1] and d["g"] == [8, 3, 3, 3]


def test_a_zero_fibre_read_by_another_layer_stays_and_keeps_its_group_peer():
    # Input 2's fibre is zero in the grouped conv, but another conv reads channel 2: it stays, and
    # channel 7 (zero fibre too, read by no one else) may go only with a peer in group 0: none, so it stays.
    a, g = _w(8, 3, 1, 1), _w(8, 4, 3, 3)
    g[0:4, 2] = 0
    g[4:8, 3] = 0
    side = np.zeros((5, 8, 1, 1), np.float32)
    side[:, 2] = 1.0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Relu", ["t1"], ["t2"]),
             helper.make_node("Conv", ["t2", "g"], ["t3"], group=2, pads=[1, 1, 1, 1], name="g"),
             helper.make_node("Conv", ["t3", "c"], ["t4"], name="c"),
             helper.make_node("Conv", ["t2", "s"], ["t5"], name="s"),
             helper.make_node("Add", ["t4", "t5"], ["y"])]
    res = _exact(_model(nodes, {"a": a, "g": g, "c": _w(5, 8, 1, 1), "s": side}, (2, 3, 6, 6), (2, 5, 6, 6)))
    d = _dims(res.model)
    assert d["a"] == [8, 3, 1, 1] and d["g"] == [8, 4, 3, 3] and d["s"] == [5, 8, 1, 1]


def test_a_grouped_conv_whose_output_is_the_graph_output_loses_inputs_per_group():
    a = _w(8, 3, 1, 1)
    a[[0, 4]] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Conv", ["t1", "g"], ["y"], group=2, pads=[1, 1, 1, 1], name="g")]
    res = _exact(_model(nodes, {"a": a, "g": _w(4, 4, 3, 3)}, (2, 3, 6, 6), (2, 4, 6, 6)))
    d = _dims(res.model)
    assert d["a"] == [6, 3, 1, 1] and d["g"] == [4, 3, 3, 3] and _group(res.model, "g") == 2


def _chain(g2_zero: list[int]) -> onnx.ModelProto:
    """g2 (2 groups of 4) then g4 (4 groups of 2) on the same 8 channels."""
    g2 = _w(8, 4, 3, 3)
    g2[g2_zero] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Relu", ["t1"], ["t2"]),
             helper.make_node("Conv", ["t2", "g2"], ["t3"], group=2, pads=[1, 1, 1, 1], name="g2"),
             helper.make_node("Relu", ["t3"], ["t4"]),
             helper.make_node("Conv", ["t4", "g4"], ["t5"], group=4, name="g4"),
             helper.make_node("Conv", ["t5", "c"], ["y"], name="c")]
    inits = {"a": _w(8, 3, 1, 1), "g2": g2, "g4": _w(8, 2, 1, 1), "c": _w(5, 8, 1, 1)}
    return _model(nodes, inits, (2, 3, 6, 6), (2, 5, 6, 6))


def test_two_grouped_convs_settle_together():
    # g2's zero filters 0, 1, 4: g2 keeps one of 0, 1 for its groups, then g4 (groups {0,1}, {2,3},
    # {4,5}, {6,7}) needs 1 and 4 back as peers: the fixpoint keeps everything, and says why.
    res = _exact(_chain([0, 1, 4]))
    d = _dims(res.model)
    assert d["g2"] == [8, 4, 3, 3] and d["g4"] == [8, 2, 1, 1] and res.report["totals"]["channels_removed"] == 0
    assert set(res.report["zeros_kept"]) == {"Conv g2 (keeps its 2 groups equal)", "Conv g4 (keeps its 4 groups equal)"}
    # Zero filters 0, 1, 4, 5: two whole groups of g4 go, and g2 keeps 2 per group.
    res = _exact(_chain([0, 1, 4, 5]))
    d = _dims(res.model)
    assert d["g2"] == [4, 4, 3, 3] and d["g4"] == [4, 2, 1, 1] and d["c"] == [5, 4, 1, 1]
    assert _group(res.model, "g2") == 2 and _group(res.model, "g4") == 2 and not res.report["zeros_kept"]


def test_a_whole_group_goes_and_the_others_stay_equal():
    # Group 1 of 4 is read only from a's zero filters 2, 3: it goes whole; group 2 loses input 4 but
    # not input 5, so 4 stays (as ZERO) and every group left keeps 2 inputs and 2 outputs.
    a = _w(8, 3, 1, 1)
    a[[2, 3, 4]] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Conv", ["t1", "g"], ["t2"], group=4, pads=[1, 1, 1, 1], name="g"),
             helper.make_node("Relu", ["t2"], ["t3"]),
             helper.make_node("Conv", ["t3", "c"], ["y"], name="c")]
    res = _exact(_model(nodes, {"a": a, "g": _w(8, 2, 3, 3), "c": _w(5, 8, 1, 1)}, (2, 3, 6, 6), (2, 5, 6, 6)))
    d = _dims(res.model)
    assert d["a"] == [6, 3, 1, 1] and d["g"] == [6, 2, 3, 3] and d["c"] == [5, 6, 1, 1]
    assert _group(res.model, "g") == 3


def test_depthwise_stays_channel_by_channel():
    a = _w(6, 3, 1, 1)
    a[[1, 4]] = 0
    nodes = [helper.make_node("Conv", ["x", "a"], ["t1"], name="a"),
             helper.make_node("Conv", ["t1", "dw"], ["t2"], group=6, pads=[1, 1, 1, 1], name="dw"),
             helper.make_node("Conv", ["t2", "c"], ["y"], name="c")]
    res = _exact(_model(nodes, {"a": a, "dw": _w(6, 1, 3, 3), "c": _w(4, 6, 1, 1)}, (2, 3, 5, 5), (2, 4, 5, 5)))
    d = _dims(res.model)
    assert d["a"] == [4, 3, 1, 1] and d["dw"] == [4, 1, 3, 3] and _group(res.model, "dw") == 4
