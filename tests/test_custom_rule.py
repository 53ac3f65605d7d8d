"""The extension point: a rule of one's own for an op the surgery does not know (the example in docs/surgery.md)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import sslcompress
from sslcompress.surgery.ops import base


class QuickGelu(sslcompress.Unary):
    """com.microsoft QuickGelu: x * sigmoid(alpha * x), each channel on its own."""

    f = staticmethod(lambda v, node: v / (1 + np.exp(-node.attributes["alpha"].value * v)))


def _model():
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    w1[[1, 5]] = 0
    w2 = rng.normal(size=(4, 8, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["t"], pads=[1] * 4, name="c1"),
                           helper.make_node("QuickGelu", ["t"], ["u"], domain="com.microsoft", alpha=1.702, name="g"),
                           helper.make_node("Conv", ["u", "w2"], ["y"], pads=[1] * 4, name="c2")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_an_unknown_op_is_a_wall_that_says_so(monkeypatch):
    monkeypatch.setattr(base, "_RULES", dict(base._RULES))
    res = sslcompress.compress(_model())
    assert res.verification.passed and res.report["totals"]["channels_removed"] == 0
    assert res.report["blocked_by"] == {"QuickGelu g (no rule for this op of domain com.microsoft)": 2}


def test_a_registered_rule_lets_the_channels_go(monkeypatch):
    monkeypatch.setattr(base, "_RULES", dict(base._RULES))
    sslcompress.register_rule("QuickGelu", QuickGelu(), domain="com.microsoft")
    model = _model()
    res = sslcompress.compress(model)
    assert res.verification.passed and res.report["blocked_by"] == {}
    dims = {i.name: list(i.dims) for i in res.model.graph.initializer}
    assert dims == {"w1": [6, 3, 3, 3], "w2": [4, 6, 3, 3]}
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    ref, got = _run(model, x), _run(res.model, x)
    assert np.max(np.abs(ref - got)) <= 1e-5 * np.max(np.abs(ref))


def test_a_rule_applies_to_its_opset_range_only(monkeypatch):
    monkeypatch.setattr(base, "_RULES", dict(base._RULES))
    sslcompress.register_rule("QuickGelu", QuickGelu(), domain="com.microsoft", opsets=(2, None))
    res = sslcompress.compress(_model())  # the model imports com.microsoft at version 1
    assert res.report["totals"]["channels_removed"] == 0 and res.report["blocked_by"]
