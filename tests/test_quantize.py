"""`sslcompress quantize`: ORT static INT8 (QDQ, per-channel weights) of a trained model, dense or compact, with
top-1 before and after on the same test images; one clear line for what it cannot take."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper
from onnx_edits import free_height_and_width

from sslcompress.cli import main
from sslcompress.models import ModelSpec, build_model
from sslcompress.quantize import check_quantizable, quantize_model
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_lenet():
    """LeNet-5 trained six epochs on the digits, conv1 filters 12.. held at zero all along (as after
    sparsify): the structured model the surgery makes of it keeps 12 of 20 filters."""
    from sslcompress.data import load_data

    torch.manual_seed(0)
    model = build_model(ModelSpec("lenet5", 10, 1, (28, 28)))
    data = load_data("digits", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for epoch in range(6):
        for x, y in data.batches("train", 64, shuffle=True, seed=0, epoch=epoch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            with torch.no_grad():
                model.conv1.weight[12:] = 0
                model.conv1.bias[12:] = 0
    return export_onnx(model.eval(), (1, 1, 28, 28), dynamic_batch=True).model


def test_int8_keeps_the_accuracy_of_the_dense_and_the_compact_model(trained_lenet):
    compact = compress(trained_lenet).model
    for proto in (trained_lenet, compact):
        result = quantize_model(proto, "digits", calibration=64, test_images=360)
        acc = result.report["accuracy"]
        assert acc["float32"] > 0.8 and acc["test_images"] == 360
        # MinMax INT8 of a small CNN loses at most a point or two; a broken calibration loses far more.
        assert acc["int8"] >= acc["float32"] - 0.02, acc
        ops = {n.op_type for n in result.model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        # Weights are int8 initializers, one scale per output channel of each conv.
        int8 = [i for i in result.model.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 4]
        assert int8 and result.report["bytes"]["after"] < result.report["bytes"]["before"]
    conv1 = [i for i in compact.graph.initializer if list(i.dims) == [12, 1, 5, 5]]
    assert conv1  # the quantized compact model is the structured one


def test_cli_writes_the_model_and_the_report(tmp_path, trained_lenet):
    src, out, report = tmp_path / "m.onnx", tmp_path / "m8.onnx", tmp_path / "q.json"
    onnx.save(trained_lenet, src)
    res = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--data", "digits", "--calibration", "32",
                                    "--data-limit", "128", "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "int8" in res.output and str(out) in res.output
    doc = json.loads(report.read_text())
    assert doc["calibration"]["images"] == 32 and doc["accuracy"]["test_images"] == 128
    # Quantizing again is refused in one line, and nothing is written.
    again = tmp_path / "m88.onnx"
    res = CliRunner().invoke(main, ["quantize", str(out), "-o", str(again), "--data", "digits"])
    assert res.exit_code == 2 and "quantized already" in res.output and not again.exists()


def _graph(elem: int, shape: list) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", elem, shape)
    y = helper.make_tensor_value_info("y", elem, None)
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))


@pytest.mark.parametrize(("proto", "says"), [
    (_graph(TensorProto.FLOAT16, [1, 1, 8, 8]), "float32"),
    (_graph(TensorProto.FLOAT, [1, 64]), "images"),
])
def test_what_cannot_be_quantized_is_named(proto, says):
    from sslcompress.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=says):
        check_quantizable(proto)


def test_images_of_another_shape_are_refused(trained_lenet):
    from sslcompress.errors import DataError

    proto = _graph(TensorProto.FLOAT, [1, 3, 32, 32])
    with pytest.raises(DataError, match="28x28"):
        quantize_model(proto, "digits", calibration=8)


def _shift_model(scale: float = 1.0, eps: float = 0.0) -> onnx.ModelProto:
    """x -> Conv -> Relu -> BatchNormalization(scale, shift, mean 0, variance 1, eps) -> Relu -> Conv: the second
    normalisation is how the cut adds a constant residual branch in float32 when scale is 1 and eps 0."""
    import numpy as np

    rng = np.random.default_rng(0)
    c = 8
    inits = [onnx.numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", rng.standard_normal((c, 3, 3, 3))), ("w2", rng.standard_normal((4, c, 1, 1))),
        ("scale", np.full(c, scale)), ("shift", rng.standard_normal(c)), ("mean", np.zeros(c)), ("var", np.ones(c)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("BatchNormalization", ["b", "scale", "shift", "mean", "var"], ["c"], epsilon=eps,
                              name="blk.constant_branch"),
             helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("Conv", ["d", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "shift", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_pure_shift_is_quantized_as_an_integer_add():
    import numpy as np
    import onnxruntime as ort

    from sslcompress.quantize import quantize_qdq, shifts_as_adds

    proto = _shift_model()
    added = shifts_as_adds(proto)
    ops = [n.op_type for n in added.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Add") == 1
    assert {t.name for t in added.graph.initializer} == {"w1", "w2", "blk.constant_branch.shift"}
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ys = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
          for m in (proto, added)]
    np.testing.assert_array_equal(ys[0], ys[1])  # x + shift either way
    # Quantized, the sum is an integer Add between QDQ pairs, not a float normalisation.
    quantized, _ = quantize_qdq(proto, x)
    q_ops = [n.op_type for n in quantized.graph.node]
    assert "BatchNormalization" not in q_ops
    add = next(n for n in quantized.graph.node if n.op_type == "Add")
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    assert all(producers.get(i) == "DequantizeLinear" for i in add.input)
    # A normalisation that scales, or has an epsilon, is left as it is.
    for other in (_shift_model(scale=2.0), _shift_model(eps=1e-5)):
        assert shifts_as_adds(other) is other


def _channels_last(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model behind a Transpose from (N, H, W, C), as TensorFlow's exporters write an image input."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    x = out.graph.input[0]
    n, c, h, w = (d for d in x.type.tensor_type.shape.dim)
    nhwc = helper.make_tensor_value_info("x_nhwc", TensorProto.FLOAT,
                                         [n.dim_param or n.dim_value, h.dim_value, w.dim_value, c.dim_value])
    out.graph.node.insert(0, helper.make_node("Transpose", ["x_nhwc"], [x.name], perm=[0, 3, 1, 2]))
    del out.graph.input[:]
    out.graph.input.append(nhwc)
    onnx.checker.check_model(out)
    return out


def test_a_channels_last_model_gets_its_images_channels_last(tmp_path, trained_lenet):
    """A (batch, H, W, C) input is calibrated and scored on the same images, transposed: the same top-1 as the
    channels-first model before and after INT8, and the bench scores it too."""
    nhwc = _channels_last(trained_lenet)
    first = quantize_model(trained_lenet, "digits", calibration=32, test_images=120).report["accuracy"]
    last = quantize_model(nhwc, "digits", calibration=32, test_images=120).report["accuracy"]
    assert last["float32"] == first["float32"] > 0.8
    assert abs(last["int8"] - first["int8"]) <= 2 / 120  # the same ranges; a rounding may differ
    src = tmp_path / "nhwc.onnx"
    onnx.save(nhwc, src)
    report = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", str(src), "--data", "digits", "--data-limit", "64", "--threads", "1",
                                    "--batch", "1", "--repeat", "1", "--warmup", "0", "-q", "--out", str(report)])
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    scored = {v["name"]: v["accuracy"] for v in doc["variants"]}
    assert scored["dense"] > 0.8 and scored["structured"] == scored["dense"], scored


def test_images_that_fit_neither_layout_are_one_sentence():
    import numpy as np

    from sslcompress.data.layout import in_input_layout
    from sslcompress.errors import DataError

    x = np.zeros((2, 1, 28, 28), np.float32)
    assert in_input_layout(x, (None, 1, 28, 28), "d") is x
    assert in_input_layout(x, (None, 28, 28, 1), "d").shape == (2, 28, 28, 1)
    with pytest.raises(DataError, match=r"1x28x28 images but the model takes 28x1x28 \(CxHxW, or HxWxC"):
        in_input_layout(x, (None, 28, 1, 28), "d")


def test_a_dynamic_size_model_is_calibrated_on_the_data_and_stays_dynamic(trained_lenet):
    """Height and width left free at export: the data's images fit them, and the INT8 model keeps them free."""
    import numpy as np
    import onnxruntime as ort

    dynamic = free_height_and_width(trained_lenet)
    fixed = quantize_model(trained_lenet, "digits", calibration=32, test_images=120).report["accuracy"]
    result = quantize_model(dynamic, "digits", calibration=32, test_images=120)
    assert result.report["accuracy"]["float32"] == fixed["float32"]
    assert abs(result.report["accuracy"]["int8"] - fixed["int8"]) <= 2 / 120
    q_dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in q_dims[2:]] == ["h", "w"]
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape == (2, 10)
