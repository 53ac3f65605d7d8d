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


def test_channels_stacked_with_rows_into_a_sequences_features_follow_them():
    # A text recogniser's step from CNN to sequence: (N, C, H, W) -> (N, C * H, W), a Conv1d over W reading the
    # C * H features. Channel c is features c * H ... c * H + H - 1: two zero filters take 2 * H of them.
    import torch
    from torch import nn

    from sslcompress.surgery.export import export_onnx

    class CnnToSequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.seq, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv1d(8 * 6, 4, 3), nn.Linear(32, 5)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            b, c, h, w = y.shape
            return self.fc(self.seq(y.reshape(b, c * h, w)).flatten(1))

    torch.manual_seed(0)
    model = CnnToSequence().eval()
    with torch.no_grad():
        model.conv.weight[[1, 5]] = 0
        model.conv.bias[[1, 5]] = 0
    for dynamic in (False, True):
        proto = export_onnx(model, (1, 3, 6, 10), dynamic_batch=dynamic).model
        res = compress(proto)
        assert res.verification.passed and res.report["blocked_by"] == {}
        assert _dims(res.model)["seq.weight"][1] == 6 * 6  # 48 features less the two channels' 2 x 6 rows
        x = np.random.default_rng(3).normal(size=(2 if dynamic else 1, 3, 6, 10)).astype(np.float32)
        want, got = (ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])
                     .run(None, {"input": x})[0] for p in (proto, res.model))
        assert np.max(np.abs(want - got)) <= 1e-5 * np.max(np.abs(want))
