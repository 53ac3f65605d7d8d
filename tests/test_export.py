"""ONNX export, simplification, file I/O and ORT verification (stage 2 foundations)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sslcompress.errors import SSLCompressError, UnsupportedModelError, VerificationError
from sslcompress.finetune.checkpoint import Checkpoint, save_checkpoint
from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.export import export_checkpoint, export_onnx, load_onnx, save_onnx
from sslcompress.surgery.verify import compare, ort_runner, verify_against_torch, verify_or_raise

SPECS = {
    "lenet5": ModelSpec("lenet5", 10, 1, (28, 28)),
    "resnet20": ModelSpec("resnet20", 10, 3, (32, 32)),
    "convnet": ModelSpec("convnet"),
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(SPECS[name])


@pytest.fixture(scope="module")
def lenet(one_thread):
    model = _model("lenet5")
    return model, export_onnx(model, SPECS["lenet5"].input_shape)


@pytest.mark.parametrize("name", list(SPECS))
def test_export_matches_torch(name, one_thread):
    model = _model(name)
    model.train()
    result = export_onnx(model, SPECS[name].input_shape)
    assert model.training, "the export restores the model's mode"
    onnx.checker.check_model(result.model, full_check=True)
    assert [i.name for i in result.model.graph.input] == ["input"]
    assert [o.name for o in result.model.graph.output] == ["output"]
    assert result.nodes_after <= result.nodes_before_simplify
    check = verify_against_torch(model, result.model, SPECS[name].input_shape)
    assert check.passed, check
    assert check.top1_agreement == 1.0
    assert check.n_inputs == 4


def test_resnet20_batchnorm_folded(one_thread):
    result = export_onnx(_model("resnet20"), SPECS["resnet20"].input_shape)
    assert result.bn_folded and result.bn_remaining == 0
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    assert not any(n.op_type == "Identity" for n in result.model.graph.node)


def test_batchnorm_after_relu_is_reported_not_folded(one_thread):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3),
    )
    with torch.no_grad():
        model[2].running_mean.normal_()
        model[2].running_var.uniform_(0.5, 2.0)
    result = export_onnx(model, (1, 3, 8, 8))
    assert result.bn_remaining == 1 and not result.bn_folded
    assert verify_against_torch(model, result.model, (1, 3, 8, 8)).passed


def test_export_checkpoint(tmp_path, one_thread):
    spec = SPECS["lenet5"]
    model = _model("lenet5")
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, Checkpoint(kind="pretrained", model=spec, state_dict=model.state_dict()))
    result = export_checkpoint(path, dynamic_batch=True)
    assert not _dim0(result.model).HasField("dim_value")
    assert verify_against_torch(model, result.model, spec.input_shape, batch=3).passed


def test_bad_input_shape_is_refused():
    with pytest.raises(UnsupportedModelError, match="input shape"):
        export_onnx(_model("lenet5"), (1, 0, 28, 28))


def test_unsimplified_export_keeps_the_raw_graph(one_thread):
    result = export_onnx(_model("resnet20"), SPECS["resnet20"].input_shape, simplify=False)
    assert result.nodes_after == result.nodes_before_simplify


def _dim0(model: onnx.ModelProto) -> onnx.TensorShapeProto.Dimension:
    return model.graph.input[0].type.tensor_type.shape.dim[0]


def test_static_export_has_batch_one(lenet):
    _, result = lenet
    assert not result.dynamic_batch
    assert _dim0(result.model).dim_value == 1
    x = np.zeros((1, 1, 28, 28), np.float32)
    assert ort_runner(result.model)(x)[0].shape == (1, 10)


def test_dynamic_batch_stays_symbolic(one_thread):
    model = _model("lenet5")
    result = export_onnx(model, SPECS["lenet5"].input_shape, dynamic_batch=True)
    assert result.dynamic_batch
    assert not _dim0(result.model).HasField("dim_value")
    assert not result.model.graph.output[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    run = ort_runner(result.model)
    for batch in (1, 5):
        assert run(np.zeros((batch, 1, 28, 28), np.float32))[0].shape == (batch, 10)
        check = verify_against_torch(model, result.model, SPECS["lenet5"].input_shape, batch=batch, n_random=2)
        assert check.passed, check


def test_save_load_round_trip(lenet, tmp_path):
    _, result = lenet
    path = tmp_path / "sub" / "m.onnx"
    save_onnx(result.model, path)
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]
    loaded = load_onnx(path)
    assert loaded.SerializeToString() == result.model.SerializeToString()
    same = compare(result.model, loaded)
    assert same.max_abs == 0.0 and same.passed


def test_load_errors(lenet, tmp_path):
    _, result = lenet
    with pytest.raises(UnsupportedModelError, match="not found"):
        load_onnx(tmp_path / "missing.onnx")
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UnsupportedModelError, match="not a readable ONNX model"):
        load_onnx(noise)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(result.model.SerializeToString()[:100])
    with pytest.raises(UnsupportedModelError, match="not a readable ONNX model"):
        load_onnx(truncated)
    future = onnx.ModelProto()
    future.CopyFrom(result.model)
    future.ir_version = 99
    (tmp_path / "future.onnx").write_bytes(future.SerializeToString())
    with pytest.raises(UnsupportedModelError, match="rejects"):
        load_onnx(tmp_path / "future.onnx")
    future.ir_version = result.model.ir_version
    future.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    (tmp_path / "opset.onnx").write_bytes(future.SerializeToString())
    with pytest.raises(SSLCompressError, match="opset"):
        load_onnx(tmp_path / "opset.onnx")


def test_compare_with_itself_is_exact(lenet):
    _, result = lenet
    same = compare(result.model, result.model, n_random=3, batch=4)
    assert same.max_abs == 0.0 and same.rel == 0.0
    assert same.top1_agreement == 1.0
    assert same.passed and same.n_inputs == 3
    assert same.max_ref > 0


def test_compare_detects_a_perturbed_weight(lenet):
    _, result = lenet
    bad = onnx.ModelProto()
    bad.CopyFrom(result.model)
    last = bad.graph.node[-1]
    assert last.op_type == "Gemm" and last.output[0] == "output"
    init = next(t for t in bad.graph.initializer if t.name == last.input[2])
    values = numpy_helper.to_array(init).copy()
    values[0] += 100.0
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    diff = compare(result.model, bad)
    assert not diff.passed
    assert diff.max_abs == pytest.approx(100.0, rel=1e-3)
    assert diff.top1_agreement is not None and diff.top1_agreement < 1.0
    with pytest.raises(VerificationError, match="max abs difference"):
        verify_or_raise(result.model, bad)
    assert verify_or_raise(result.model, result.model).passed


def test_compare_with_real_inputs_only(lenet):
    model, result = lenet
    real = [np.ones((1, 1, 28, 28), np.float32)]
    same = compare(result.model, result.model, real, n_random=0)
    assert same.n_inputs == 1 and same.passed
    check = verify_against_torch(model, result.model, SPECS["lenet5"].input_shape, real, n_random=1)
    assert check.n_inputs == 2 and check.passed
    with pytest.raises(VerificationError, match="no inputs"):
        compare(result.model, result.model, n_random=0)
