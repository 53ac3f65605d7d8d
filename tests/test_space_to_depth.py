"""A strided convolution over a few channels folded into SpaceToDepth and a stride-1 convolution computes the
same outputs in ORT (every pad form, strides 2-4, kernels larger and smaller than the stride), is left alone
where it does not qualify, and is what `quantize` hands ORT's quantizer on x86 unless told otherwise."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from sslcompress.cli import main
from sslcompress.quantize import quantize_qdq
from sslcompress.space_to_depth import strided_convs_as_space_to_depth
from sslcompress.surgery.export import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_model(c=3, m=8, k=(7, 7), size=(32, 32), bias=True, batch="N", opset=17, **attrs):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((m, c, *k)).astype(np.float32), "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "b"))
    conv = helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["y"], name="stem", **attrs)
    graph = helper.make_graph([conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, *size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(proto, x):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("c, k, attrs, size", [
    (3, (7, 7), {"strides": [2, 2], "pads": [3, 3, 3, 3]}, (32, 32)),  # ResNet's stem
    (3, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}, (32, 32)),  # MobileNet's
    (3, (4, 4), {"strides": [4, 4]}, (32, 32)),  # ConvNeXt's patches: a 1x1 conv after folding
    (1, (5, 3), {"strides": [2, 2], "pads": [1, 2, 2, 0]}, (16, 20)),  # uneven kernel and pads
    (4, (2, 2), {"strides": [2, 2]}, (12, 8)),  # kernel as large as the stride
    (3, (3, 3), {"strides": [4, 4], "pads": [2, 0, 1, 3]}, (24, 16)),  # kernel below the stride
    (3, (5, 5), {"strides": [3, 3], "auto_pad": "SAME_UPPER"}, (18, 27)),
    (3, (4, 4), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}, (16, 16)),
    (2, (3, 3), {"strides": [2, 2], "auto_pad": "VALID"}, (14, 10)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_the_folded_conv_computes_the_same_outputs(c, k, attrs, size, bias):
    proto = _conv_model(c=c, k=k, size=size, bias=bias, **attrs)
    folded, done = strided_convs_as_space_to_depth(proto)
    s = attrs["strides"][0]
    assert [(f.conv, f.block, f.channels) for f in done] == [("stem", s, c * s * s)]
    ops = [n.op_type for n in folded.graph.node]
    assert ops == ["SpaceToDepth", "Conv"]
    conv = folded.graph.node[1]
    assert next(a.ints for a in conv.attribute if a.name == "strides") == [1, 1]
    assert {t.name for t in folded.graph.initializer} == ({"b"} if bias else set()) | {"stem.folded_weight"}
    x = np.random.default_rng(1).standard_normal((2, c, *size)).astype(np.float32)
    want, got = _run(proto, x), _run(folded, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("change", [
    {"c": 8},  # channels enough that the gather is not the cost
    {"strides": [1, 1]},
    {"strides": [2, 1]},  # SpaceToDepth has one block for both axes
    {"dilations": [2, 2]},
    {"size": (33, 32)},  # not whole blocks
    {"k": (1, 1)},  # a strided 1x1 is a subsampling, no gather to coarsen
    {"batch": "N", "size": ("H", "W")},  # sizes unknown
])
def test_a_conv_that_does_not_qualify_is_left_alone(change):
    args = {"c": 3, "k": (3, 3), "size": (32, 32), "strides": [2, 2], "pads": [1, 1, 1, 1], **change}
    c, k, size = args.pop("c"), args.pop("k"), args.pop("size")
    batch = args.pop("batch", "N")
    proto = _conv_model(c=c, k=k, size=size, batch=batch, **args)
    same, done = strided_convs_as_space_to_depth(proto)
    assert same is proto and done == []


def test_grouped_and_graph_input_weights_are_left_alone():
    grouped = _conv_model(c=2, m=4, k=(3, 3), strides=[2, 2], group=2)
    grouped.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w"))
    assert strided_convs_as_space_to_depth(grouped)[0] is grouped
    overridable = _conv_model(k=(3, 3), strides=[2, 2])
    overridable.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 3, 3, 3]))
    assert strided_convs_as_space_to_depth(overridable)[0] is overridable


class _Stem(torch.nn.Module):
    """A ResNet-like stem and head, as the exporters write it (BatchNorm folded, dynamic batch)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False)
        self.bn = torch.nn.BatchNorm2d(16)
        self.pool = torch.nn.MaxPool2d(3, 2, 1)
        self.body = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.relu(self.body(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def stem_model():
    torch.manual_seed(0)
    model = _Stem().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2)
    return export_onnx(model, (1, 3, 32, 32), dynamic_batch=True).model


def test_an_exported_stem_folds_exactly_and_quantizes_folded(stem_model):
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32)
    name = stem_model.graph.input[0].name
    folded, done = strided_convs_as_space_to_depth(stem_model)
    assert len(done) == 1 and done[0].kernel == (4, 4)  # the 3x3 body conv (16 channels, stride 1) stays
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
            for m in (stem_model, folded)]
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5, atol=1e-5 * np.abs(runs[0]).max())

    calib = np.random.default_rng(3).standard_normal((16, 3, 32, 32)).astype(np.float32)
    int8, notes = quantize_qdq(stem_model, calib, space_to_depth=True)
    plain, plain_notes = quantize_qdq(stem_model, calib, space_to_depth=False)
    assert "SpaceToDepth" in {n.op_type for n in int8.graph.node}
    assert "SpaceToDepth" not in {n.op_type for n in plain.graph.node}
    assert any("SpaceToDepth" in n for n in notes) and not any("SpaceToDepth" in n for n in plain_notes)
    # The folded conv is quantized like any other: integer weights, its input read through a QDQ pair.
    producers = {o: n for n in int8.graph.node for o in n.output}
    conv = next(n for n in int8.graph.node if n.op_type == "Conv" and "folded" in producers[n.input[1]].input[0])
    assert producers[conv.input[0]].op_type == "DequantizeLinear"
    # Both INT8 models compute the float model's outputs to within INT8's rounding, and each other's.
    y8, yp = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
              for m in (int8, plain))
    span = np.abs(runs[0]).max()
    assert np.abs(y8 - runs[0]).max() < 0.1 * span and np.abs(y8 - yp).max() < 0.1 * span
    assert (y8.argmax(1) == yp.argmax(1)).mean() >= 0.75


def test_the_cli_folds_by_default_on_x86_and_not_when_told(tmp_path, monkeypatch):
    torch.manual_seed(0)

    class Digits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 8, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    path = tmp_path / "m.onnx"
    onnx.save(export_onnx(Digits().eval(), (1, 1, 28, 28), dynamic_batch=True).model, path)
    monkeypatch.setattr("sslcompress.quantize._x86", lambda: True)
    for flag, folds in (([], True), (["--no-space-to-depth"], False), (["--space-to-depth"], True)):
        out = tmp_path / f"q{len(flag)}{folds}.onnx"
        result = CliRunner().invoke(main, ["quantize", str(path), "-o", str(out), "--data", "digits", "--calibration",
                                           "32", "--data-limit", "64", "--json", *flag])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert any("SpaceToDepth" in n for n in report["notes"]) is folds
        assert ("SpaceToDepth" in {n.op_type for n in onnx.load(out).graph.node}) is folds
    monkeypatch.setattr("sslcompress.quantize._x86", lambda: False)
    out = tmp_path / "arm.onnx"
    result = CliRunner().invoke(main, ["quantize", str(path), "-o", str(out), "--data", "digits", "--calibration",
                                       "32", "--data-limit", "64", "--json"])
    assert result.exit_code == 0 and not any("SpaceToDepth" in n for n in json.loads(result.output)["notes"])


def test_the_fold_moves_behind_the_input_quantization_bit_for_bit(stem_model, monkeypatch):
    from sslcompress import space_to_depth as s2d

    name = stem_model.graph.input[0].name
    calib = np.random.default_rng(3).standard_normal((16, 3, 32, 32)).astype(np.float32)
    x = np.random.default_rng(4).standard_normal((4, 3, 32, 32)).astype(np.float32)
    monkeypatch.setattr(s2d, "quantize_before_space_to_depth", lambda proto: (proto, 0))
    unmoved, _ = quantize_qdq(stem_model, calib, space_to_depth=True)
    monkeypatch.undo()
    if not s2d._uint8_space_to_depth():
        assert s2d.quantize_before_space_to_depth(unmoved)[0] is unmoved
        pytest.skip("this ONNX Runtime has no uint8 SpaceToDepth: the fold stays in float (checked above)")
    moved, count = s2d.quantize_before_space_to_depth(unmoved)
    assert count == 1
    producers = {o: n.op_type for n in moved.graph.node for o in n.output}
    fold = next(n for n in moved.graph.node if n.op_type == "SpaceToDepth")
    assert fold.input[0] != name and producers[fold.input[0]] == "QuantizeLinear"
    onnx.checker.check_model(moved)
    ys = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
          for m in (unmoved, moved)]
    np.testing.assert_array_equal(ys[1], ys[0])
    _, notes = quantize_qdq(stem_model, calib, space_to_depth=True)
    assert any("uint8" in n for n in notes)


def test_a_per_channel_quantization_after_the_fold_stays_after_it():
    from sslcompress.space_to_depth import quantize_before_space_to_depth

    inits = [numpy_helper.from_array(np.full(12, 0.1, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(12, np.uint8), "zero")]
    nodes = [helper.make_node("SpaceToDepth", ["x"], ["s"], blocksize=2),
             helper.make_node("QuantizeLinear", ["s", "scale", "zero"], ["q"], axis=1),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 2, 2])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert quantize_before_space_to_depth(proto) == (proto, 0)


@pytest.mark.parametrize("how", ["legacy-opset11-raw", "dynamo"])
def test_the_fold_is_exact_on_torch_exports_as_others_write_them(how, tmp_path):
    """torch's own exports, not ours: the legacy exporter unsimplified (BatchNorm still a node) at opset 11, and
    the dynamo exporter; the folded model against ORT on the export as it came."""
    import io

    torch.manual_seed(0)
    model = _Stem().eval()
    x = torch.randn(2, 3, 32, 32)
    if how == "dynamo":
        proto = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                  verbose=False).model_proto
    else:
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, opset_version=11, dynamo=False, input_names=["x"], output_names=["y"],
                          do_constant_folding=False)
        proto = onnx.load_from_string(buf.getvalue())
    folded, done = strided_convs_as_space_to_depth(proto)
    assert len(done) == 1 and done[0].block == 2 and done[0].channels == 12
    xs = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    want, got = _run(proto, xs), _run(folded, xs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
