"""Sizes read at run time: a channel count that follows its tensor, and one that must pin it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sslcompress import compress


def _w(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _model(nodes, inits, x_shape, outputs):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                          [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _agree(a, b, shape):
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    ra = ort.InferenceSession(a.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    rb = ort.InferenceSession(b.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for u, v in zip(ra, rb, strict=True):
        assert u.shape == v.shape and np.max(np.abs(u - v)) <= 1e-5 * np.max(np.abs(u))


def _dims(model):
    return {i.name: list(i.dims) for i in model.graph.initializer}


def test_resize_sizes_read_from_its_own_input_follow_the_channels():
    # F.interpolate(x, size=(16, 16)) at a dynamic batch: sizes = Concat(Shape(x)[:2], [16, 16]).
    w1 = _w(6, 3, 3, 3)
    w1[[0, 3]] = 0
    nodes = [helper.make_node("Conv", ["x", "w1"], ["t"], pads=[1] * 4, name="c1"),
             helper.make_node("Shape", ["t"], ["s"], end=2),
             helper.make_node("Concat", ["s", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["t", "", "", "sizes"], ["r"], mode="nearest"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    inits = {"w1": w1, "w2": _w(4, 6, 1, 1, seed=1), "hw": np.array([16, 16], np.int64)}
    model = _model(nodes, inits, ("N", 3, 8, 8), ["y"])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    res = compress(model)
    assert res.verification.passed and res.report["blocked_by"] == {}
    assert _dims(res.model)["w1"] == [4, 3, 3, 3] and _dims(res.model)["w2"] == [4, 4, 1, 1]
    _agree(model, res.model, (2, 3, 8, 8))


def test_a_channel_count_read_as_data_pins_the_channels():
    # y = t + ConstantOfShape(Shape(t)) with a dynamic batch: the count reaches ConstantOfShape, which
    # no rule follows, so t's zero channels must stay (deleting them would change the shape it makes).
    w1 = _w(6, 3, 1, 1)
    w1[[1, 2]] = 0
    nodes = [helper.make_node("Conv", ["x", "w1"], ["t"], name="c1"),
             helper.make_node("Shape", ["t"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["ones"],
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("Add", ["t", "ones"], ["u"]),
             helper.make_node("Conv", ["u", "w2"], ["y"], name="c2")]
    model = _model(nodes, {"w1": w1, "w2": _w(4, 6, 1, 1, seed=1)}, ("N", 3, 5, 5), ["y"])
    res = compress(model)
    assert res.verification.passed
    assert _dims(res.model)["w1"] == [6, 3, 1, 1]
    assert res.report["zeros_kept"] == {"Shape s (the channel count is read as data)": 2}
    _agree(model, res.model, (2, 3, 5, 5))
