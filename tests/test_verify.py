"""Verification beyond one number: the first diverging node, real inputs from a data spec."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sslcompress.errors import DataError, UnsupportedModelError
from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery import compress as compress_mod
from sslcompress.surgery.compress import compress
from sslcompress.surgery.diverge import first_diverging_node
from sslcompress.surgery.export import export_onnx
from sslcompress.surgery.inputs import random_batches, real_inputs

LENET = ModelSpec("lenet5", 10, 1, (28, 28))


def _lenet(sparse: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(LENET)
    if sparse:
        with torch.no_grad():
            m.conv1.weight[6:] = 0
            m.conv1.bias[6:] = 0
    return m


@pytest.fixture(scope="module")
def dense(one_thread) -> onnx.ModelProto:
    return export_onnx(_lenet(False), LENET.input_shape).model


@pytest.fixture(scope="module")
def sparse(one_thread) -> onnx.ModelProto:
    return export_onnx(_lenet(True), LENET.input_shape, dynamic_batch=True).model


def _perturbed(model: onnx.ModelProto, init_name: str, delta: float = 1.0) -> onnx.ModelProto:
    """A copy with one initializer's first element moved by ``delta``: a deliberately broken model."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    init = next(t for t in bad.graph.initializer if t.name == init_name)
    values = numpy_helper.to_array(init).copy()
    values.flat[0] += delta
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    return bad


def _x(shape=(1, 1, 28, 28), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("weight, node", [("conv1.weight", "/conv1/Conv"), ("conv2.weight", "/conv2/Conv"),
                                          ("fc1.bias", "/fc1/Gemm")])
def test_names_the_perturbed_node(dense, weight, node):
    found = first_diverging_node(dense, _perturbed(dense, weight), [_x()])
    assert found is not None
    assert (found.node, found.op_type) == (node, node.split("/")[-1])
    assert found.value == next(n.output[0] for n in dense.graph.node if n.name == node)
    assert found.max_abs > 1e-4 * found.max_ref and found.input_index == 0


def test_identical_models_have_no_divergence(dense):
    assert first_diverging_node(dense, dense, [_x(), _x(seed=1)]) is None
    assert first_diverging_node(dense, _perturbed(dense, "conv2.weight"), []) is None


def test_tiny_change_is_within_the_criterion(dense):
    assert first_diverging_node(dense, _perturbed(dense, "fc2.bias", 1e-7), [_x()]) is None


def test_later_input_shows_the_difference(dense):
    # A zero input hides any change of conv weights (conv(0) is the bias), so only the second shows it.
    bad = _perturbed(dense, "conv1.weight")
    assert first_diverging_node(dense, bad, [np.zeros((1, 1, 28, 28), np.float32)]) is None
    found = first_diverging_node(dense, bad, [np.zeros((1, 1, 28, 28), np.float32), _x()])
    assert found is not None and found.input_index == 1 and found.node == "/conv1/Conv"


def test_pruned_shapes_are_skipped(sparse):
    compact = compress(sparse).model
    shapes = {t.name: list(t.dims) for t in compact.graph.initializer}
    assert shapes["conv1.weight"] == [6, 1, 5, 5]
    # conv1's own output has 6 channels against 20: not comparable, so the first comparable
    # value past the fault is conv2's.
    found = first_diverging_node(sparse, _perturbed(compact, "conv1.weight"), [_x((2, 1, 28, 28))])
    assert found is not None and found.node == "/conv2/Conv"
    found = first_diverging_node(sparse, _perturbed(compact, "fc1.weight"), [_x((2, 1, 28, 28))])
    assert found is not None and found.node == "/fc1/Gemm"


def test_compress_reports_the_diverging_node_only_on_failure(sparse, monkeypatch):
    ok = compress(sparse).report["verification"]
    assert ok["passed"] and ok["first_diverging_node"] is None
    real = compress_mod.finish
    # A deliberately broken surgery: the compact model's conv2 bias moved by 5.
    monkeypatch.setattr(compress_mod, "finish", lambda model: _perturbed(real(model), "conv2.bias", 5.0))
    v = compress(sparse).report["verification"]
    assert not v["passed"]
    assert v["first_diverging_node"]["node"] == "/conv2/Conv"
    assert v["first_diverging_node"]["op_type"] == "Conv"


def test_real_inputs_static_and_dynamic_batch(dense, sparse):
    static = real_inputs(dense, "digits", limit=5)
    assert len(static) == 5 and all(x.shape == (1, 1, 28, 28) and x.dtype == np.float32 for x in static)
    assert float(np.concatenate(static).min()) < 0  # normalized like training, not raw uint8/255
    dynamic = real_inputs(sparse, "digits", limit=20)
    assert [x.shape[0] for x in dynamic] == [16, 4]


def test_real_inputs_refuse_a_shape_mismatch(dense):
    with pytest.raises(DataError, match=r"3x32x32 images but the model's input 'input' is 1x28x28"):
        real_inputs(dense, "synthetic:3x32x32:10", limit=4)
    with pytest.raises(DataError, match="positive"):
        real_inputs(dense, "digits", limit=0)
    with pytest.raises(DataError, match="unknown data set"):
        real_inputs(dense, "nope", limit=4)


def test_real_inputs_come_channels_last_to_a_channels_last_input(sparse):
    """A (batch, H, W, C) input, as TensorFlow's exporters write it, gets the same images moved channels last."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 28, 28, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 28, 28, 1])
    nhwc = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 17)])
    last = real_inputs(nhwc, "digits", limit=20)
    first = real_inputs(sparse, "digits", limit=20)
    assert [b.shape for b in last] == [(16, 28, 28, 1), (4, 28, 28, 1)]
    for a, b in zip(first, last, strict=True):
        np.testing.assert_array_equal(np.moveaxis(a, 1, -1), b)
    x.type.tensor_type.shape.dim[1].dim_value = 27  # neither layout: one sentence that names both
    nhwc.graph.input[0].CopyFrom(x)
    with pytest.raises(DataError, match=r"is 27x28x1 \(CxHxW, or HxWxC channels last\)"):
        real_inputs(nhwc, "digits", limit=4)


def test_real_inputs_need_a_full_static_batch(one_thread):
    eight = export_onnx(_lenet(False), (8, 1, 28, 28)).model
    with pytest.raises(DataError, match="exactly 8 images"):
        real_inputs(eight, "digits", limit=5)
    assert [x.shape for x in real_inputs(eight, "digits", limit=17)] == [(8, 1, 28, 28)] * 2


def test_compress_counts_real_images(sparse):
    inputs = real_inputs(sparse, "digits", limit=20)
    v = compress(sparse, inputs=inputs).report["verification"]
    assert v["passed"] and v["real_images"] == 20 and v["real_top1_agreement"] == 1.0
    assert v["inputs"] == 4 + len(inputs)
    none = compress(sparse).report["verification"]
    assert none["real_images"] == 0 and none["real_top1_agreement"] is None


def _dynamic_spatial(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dims = out.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del out.graph.value_info[:]
    return out


def test_dynamic_spatial_input_needs_real_inputs(sparse):
    model = _dynamic_spatial(sparse)
    with pytest.raises(UnsupportedModelError, match="dynamic dimension 2"):
        compress(model)
    inputs = real_inputs(model, "digits", limit=3)
    assert [b["input"].shape for b in random_batches(model, inputs, n_random=2)] == [(2, 1, 28, 28)] * 2
    v = compress(model, inputs=inputs).report["verification"]
    assert v["passed"] and v["real_images"] == 3


def test_random_batches_are_the_verification_stream(dense):
    batches = random_batches(dense, n_random=3, seed=5)
    rng = np.random.default_rng(5)
    for b in batches:  # one feed per batch; for one float32 input, the stream of single arrays
        assert list(b) == ["input"]
        np.testing.assert_array_equal(b["input"], rng.standard_normal((1, 1, 28, 28), dtype=np.float32))
    assert random_batches(dense, n_random=0) == []
