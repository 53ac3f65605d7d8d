"""Edge cases of the op rules and passes: each once made the surgery wrong, crash or miss removals."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sslcompress.surgery.compress import compress
from sslcompress.surgery.verify import compare, compare_runners

RNG = np.random.default_rng(1)


def _w(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def _zero_filters(n: int, c: int, k: int, zero: list[int]) -> np.ndarray:
    a = _w(n, c, k, k)
    a[zero] = 0
    return a


def _model(nodes, inits, x_shape, outputs, opset: int = 17, infer: bool = True) -> onnx.ModelProto:
    outs = [helper.make_tensor_value_info(f"y{i}" if len(outputs) > 1 else "y", TensorProto.FLOAT, list(s))
            for i, s in enumerate(outputs)]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              outs, [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset > 10 else 5
    return onnx.shape_inference.infer_shapes(m) if infer else m


def _exact(proto, mode: str = "off"):
    res = compress(proto, shape_lowering=mode)
    assert res.verification.passed, res.report["verification"]
    again = compare(proto, res.model, n_random=2, seed=11)
    assert again.passed
    return res


def _dims(model) -> dict[str, list[int]]:
    return {i.name: list(i.dims) for i in model.graph.initializer}


def test_a_nan_or_a_small_output_cannot_hide_a_difference():
    same_nan = compare_runners(lambda x: [np.array([np.nan, 1.0])], lambda x: [np.array([np.nan, 5.0])],
                               [np.zeros(1)], 1e-4)
    assert not same_nan.passed
    moved_nan = compare_runners(lambda x: [np.array([np.nan, 1.0])], lambda x: [np.array([1.0, np.nan])],
                                [np.zeros(1)], 1e-4)
    assert not moved_nan.passed and moved_nan.max_abs == np.inf
    both = compare_runners(lambda x: [np.array([1e5]), np.array([1.0])], lambda x: [np.array([1e5]), np.array([2.0])],
                           [np.zeros(1)], 1e-4)
    assert not both.passed and both.rel == 1.0  # the small output, on its own scale
    # NaN in both models is no match: a model whose outputs are not finite is never verified (issue 9).
    same_place = compare_runners(lambda x: [np.array([np.nan, 1.0])], lambda x: [np.array([np.nan, 1.0])],
                                 [np.zeros(1)], 1e-4)
    assert not same_place.passed and same_place.nonfinite == "output 0"


def test_pad_before_opset_11_fills_with_its_value_attribute():
    a = _zero_filters(4, 3, 1, [1])
    nodes = [helper.make_node("Conv", ["x", "a"], ["t"]),
             helper.make_node("Pad", ["t"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=2.0),
             helper.make_node("Conv", ["p", "c"], ["y"])]
    proto = _model(nodes, {"a": a, "c": _w(2, 4, 3, 3)}, (1, 3, 4, 4), [(1, 2, 4, 4)], opset=10)
    res = _exact(proto)
    assert _dims(res.model)["a"] == [4, 3, 1, 1]  # the padded zero channel holds 2 at its border: it stays


def test_a_tensor_read_inside_an_if_body_keeps_its_channels():
    body = helper.make_graph([helper.make_node("Gather", ["t", "idx"], ["g"], axis=1)], "then", [],
                             [helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 1, 6, 6])],
                             [numpy_helper.from_array(np.array([2], np.int64), "idx")])
    tail = _w(2, 6, 1, 1)
    tail[:, 1:3] = 0
    # A condition computed at run time, so the If stays an If (a constant one would be inlined).
    nodes = [helper.make_node("Conv", ["x", "a"], ["t"]),
             helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Greater", ["m", "low"], ["cond"]),
             helper.make_node("If", ["cond"], ["y1"], then_branch=body, else_branch=body),
             helper.make_node("Conv", ["t", "tw"], ["y0"])]
    proto = _model(nodes, {"a": _zero_filters(6, 3, 1, [1]), "low": np.array(-1e30, np.float32), "tw": tail},
                   (2, 3, 6, 6), [(2, 2, 6, 6), (2, 1, 6, 6)])
    res = _exact(proto)
    assert _dims(res.model)["a"] == [6, 3, 1, 1]
    assert any("read inside its subgraph" in k for k in res.report["blocked_by"])


def test_gemm_c_of_shape_m_by_1_adds_per_row_not_per_column():
    c = _w(4, 1)
    c[2] = 0
    w = _w(5, 4)
    w[:, 2] = 0  # output column 2 has a zero weight column and C's entry 2 is zero, but C adds per row
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["h"]), helper.make_node("Gemm", ["h", "v"], ["y"])]
    proto = _model(nodes, {"w": w, "c": c, "v": _w(4, 3)}, (4, 5), [(4, 3)])
    res = _exact(proto)
    assert _dims(res.model)["w"] == [5, 4]


def test_biases_computed_at_run_time_are_walls_not_crashes():
    a = _zero_filters(4, 3, 1, [1])
    nodes = [helper.make_node("Conv", ["x", "a"], ["t"]),
             helper.make_node("ReduceMean", ["t"], ["m"], axes=[0, 2, 3], keepdims=0),
             helper.make_node("Conv", ["t", "c", "m"], ["u"]),
             helper.make_node("Flatten", ["u"], ["f"]),
             helper.make_node("ReduceMean", ["f"], ["fm"], axes=[0], keepdims=0),
             helper.make_node("Gemm", ["f", "g", "fm"], ["y"])]
    proto = _model(nodes, {"a": a, "c": _w(4, 4, 1, 1), "g": _w(16, 16)}, (1, 3, 2, 2), [(1, 16)])
    _exact(proto)


def test_lowering_names_never_clash_with_the_models_own():
    w = _w(4, 3, 3, 3)
    w[:, 0, 0, 0] = 0
    w[:, 1, 1, 2] = 0
    w[:, 2, 2, 1] = 0
    nodes = [helper.make_node("Conv", ["x", "conv1.weight"], ["conv1.pad"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["conv1.pad"], ["y"])]
    proto = _model(nodes, {"conv1.weight": w}, (1, 3, 5, 5), [(1, 4, 5, 5)])
    res = _exact(proto, "on")
    assert "MatMul" in [n.op_type for n in res.model.graph.node]


def test_a_slice_that_loses_its_stride_becomes_a_gather_and_keeps_its_output_name():
    a = _zero_filters(8, 3, 1, [2, 5])
    nodes = [helper.make_node("Conv", ["x", "a"], ["t"]),
             helper.make_node("Slice", ["t", "s", "e", "ax", "st"], ["y0"]),
             helper.make_node("Slice", ["t", "s", "e", "ax", "st"], ["u"]),
             helper.make_node("Conv", ["u", "c"], ["y1"])]
    inits = {"a": a, "s": np.array([-1], np.int64), "e": np.array([-9], np.int64), "ax": np.array([1], np.int64),
             "st": np.array([-1], np.int64), "c": _w(2, 8, 1, 1)}
    proto = _model(nodes, inits, (1, 3, 3, 3), [(1, 8, 3, 3), (1, 2, 3, 3)])
    res = _exact(proto)
    assert [o.name for o in res.model.graph.output] == ["y0", "y1"]


def test_models_without_shapes_are_cut_too():
    nodes = [helper.make_node("Conv", ["x", "a"], ["t"]), helper.make_node("Conv", ["t", "c"], ["y"])]
    proto = _model(nodes, {"a": _zero_filters(4, 3, 1, [0, 3]), "c": _w(2, 4, 1, 1)}, (1, 3, 4, 4), [(1, 2, 4, 4)],
                   infer=False)
    assert not proto.graph.value_info
    assert _dims(_exact(proto).model)["a"] == [2, 3, 1, 1]


def test_flatten_with_a_negative_axis_and_a_reshape_to_minus_one_rows():
    for flat in (helper.make_node("Flatten", ["t"], ["f"], axis=-3),
                 helper.make_node("Reshape", ["t", "shape"], ["f"])):
        nodes = [helper.make_node("Conv", ["x", "a"], ["t"]), flat, helper.make_node("Gemm", ["f", "g"], ["y"])]
        inits = {"a": _zero_filters(4, 3, 1, [1, 2]), "g": _w(64, 3), "shape": np.array([-1, 64], np.int64)}
        proto = _model(nodes, inits, ("n", 3, 4, 4), [("n", 3)])
        d = _dims(_exact(proto).model)
        assert d["a"] == [2, 3, 1, 1] and d["g"] == [32, 3]


def test_a_same_padded_conv_leaves_constant_channels_be():
    a = _w(4, 3, 1, 1)
    a[1] = 0
    b = np.array([0, 0.5, 0, 0], np.float32)  # channel 1 is the constant 0.5
    nodes = [helper.make_node("Conv", ["x", "a", "b"], ["t"]),
             helper.make_node("Conv", ["t", "c"], ["y"], auto_pad="SAME_UPPER", kernel_shape=[3, 3])]
    proto = _model(nodes, {"a": a, "b": b, "c": _w(2, 4, 3, 3)}, (1, 3, 5, 5), [(1, 2, 5, 5)])
    res = _exact(proto)
    assert res.report["constant_channels_folded"] == 0
