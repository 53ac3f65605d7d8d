"""A model that is not finite never passes: training phases refuse it before saving, export
refuses a NaN weight, and verification fails on a NaN or infinity in either model (issue 9)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from sslcompress.cli import main
from sslcompress.config import FinetuneConfig, PretrainConfig, RunOptions, TrainOptions
from sslcompress.errors import TrainingError, UnsupportedModelError, VerificationError
from sslcompress.finetune import pipeline
from sslcompress.finetune.checkpoint import Checkpoint, save_checkpoint
from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.export import export_onnx
from sslcompress.surgery.verify import compare_runners, raise_if_failed

ONE_STEP = TrainOptions(epochs=1, lr=0.02, batch_size=32, weight_decay=0.0)


def _run(out, **kw) -> RunOptions:
    return RunOptions(model="lenet5", data="digits", out=str(out), limit_train=32, limit_test=32, threads=1, **kw)


def _poison(monkeypatch, which: int, value: float) -> None:
    """The `which`-th optimizer made (1-based) writes `value` into one weight at each of its steps."""
    made = {"n": 0}
    real = pipeline.make_optimizer

    def make(model, opts):
        opt = real(model, opts)
        made["n"] += 1
        if made["n"] == which:
            weight = next(p for p in model.parameters() if p.dim() > 1)

            def poison(*_):
                with torch.no_grad():
                    weight.view(-1)[0] = value

            opt.register_step_post_hook(poison)
        return opt

    monkeypatch.setattr(pipeline, "make_optimizer", make)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    return pipeline.run_pretrain(PretrainConfig(run=_run(out), train=ONE_STEP)).checkpoint


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_pretrain_whose_last_step_blows_up_writes_nothing(monkeypatch, tmp_path, value):
    _poison(monkeypatch, 1, value)
    with pytest.raises(TrainingError, match="pretrain diverged.*NaN or infinite"):
        pipeline.run_pretrain(PretrainConfig(run=_run(tmp_path), train=ONE_STEP))
    assert not (tmp_path / "pretrained.pt").exists()


def test_huge_but_finite_weights_whose_logits_overflow_are_refused(monkeypatch, tmp_path):
    _poison(monkeypatch, 1, 3e38)
    with pytest.raises(TrainingError, match="pretrain diverged.*outputs"):
        pipeline.run_pretrain(PretrainConfig(run=_run(tmp_path), train=ONE_STEP))
    assert not (tmp_path / "pretrained.pt").exists()


@pytest.mark.parametrize("which, phase", [(1, "sparsify"), (2, "finetune")])
def test_finetune_phases_refuse_a_nan_model_before_writing(monkeypatch, tmp_path, weights, which, phase):
    _poison(monkeypatch, which, float("nan"))
    cfg = FinetuneConfig(run=_run(tmp_path, weights=str(weights)), strength=0.1, sparsify=ONE_STEP, finetune=ONE_STEP)
    with pytest.raises(TrainingError, match=f"{phase} diverged"):
        pipeline.run_finetune(cfg)
    assert not (tmp_path / "sparse.pt").exists() and not (tmp_path / "report.json").exists()
    # The refusal would come back on --resume (whose options cannot change), so no resume state is left.
    assert not (tmp_path / "state.pt").exists()


def test_pretraining_inside_finetune_is_checked(monkeypatch, tmp_path):
    _poison(monkeypatch, 1, float("nan"))
    cfg = FinetuneConfig(run=_run(tmp_path), pretrain=ONE_STEP, sparsify=ONE_STEP, finetune=ONE_STEP)
    with pytest.raises(TrainingError, match="pretrain diverged"):
        pipeline.run_finetune(cfg)
    assert not (tmp_path / "pretrained.pt").exists() and not (tmp_path / "sparse.pt").exists()


def _nan_checkpoint(path):
    spec = ModelSpec("lenet5", num_classes=10, in_channels=1, input_size=(16, 16))
    state = build_model(spec).state_dict()
    name = next(k for k, v in state.items() if v.dim() > 1)
    state[name].view(-1)[3] = float("nan")
    save_checkpoint(path, Checkpoint("pretrained", spec, state))
    return name


def test_export_onnx_refuses_a_nan_weight():
    model = build_model(ModelSpec("lenet5", num_classes=10, in_channels=1, input_size=(16, 16)))
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(UnsupportedModelError, match="NaN or infinite"):
        export_onnx(model, (1, 1, 16, 16))


def test_cli_export_of_a_nan_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    ckpt = tmp_path / "nan.pt"
    name = _nan_checkpoint(ckpt)
    out, uncut = tmp_path / "c.onnx", tmp_path / "u.onnx"
    res = CliRunner().invoke(main, ["export", str(ckpt), "--onnx", str(out), "--uncut", str(uncut)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0] and "verification" not in res.output
    assert not out.exists() and not uncut.exists()


@pytest.mark.parametrize("ref, cand", [
    ([np.nan, 1.0], [np.nan, 1.0]),          # the same NaN in both models
    ([np.inf, 1.0], [np.inf, 1.0]),          # the same infinity in both
    ([np.nan, 1.0], [0.0, 1.0]),             # only in the reference
    ([0.0, 1.0], [0.0, -np.inf]),            # only in the candidate
    ([np.nan, np.nan], [np.nan, np.nan]),    # all NaN, as after a blown-up training step
])
def test_verification_fails_on_any_nonfinite_output(ref, cand):
    res = compare_runners(lambda x: [np.array(ref, np.float32)], lambda x: [np.array(cand, np.float32)],
                          [np.zeros(1)], 1e-4)
    assert not res.passed and res.nonfinite == "output 0"
    with pytest.raises(VerificationError, match="NaN or infinity at output 0"):
        raise_if_failed(res, 1e-4)


def test_finite_outputs_still_pass():
    res = compare_runners(lambda x: [np.array([1.0, 2.0])], lambda x: [np.array([1.0, 2.0 + 1e-6])],
                          [np.zeros(1)], 1e-4)
    assert res.passed and res.nonfinite is None


def test_surgery_of_a_model_with_a_nan_weight_says_so_and_writes_nothing(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((4, 3, 1, 1), np.float32)
    w[2, 0] = np.nan
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
                          [numpy_helper.from_array(w, "w")])
    src, out = tmp_path / "nan.onnx", tmp_path / "cut.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out)])
    assert res.exit_code == 2 and not out.exists()
    assert "NaN or infinity at output 'y'" in res.output and "nothing written" in res.output


def test_export_refuses_nan_buffers_and_infinite_norm_statistics_but_keeps_an_infinite_mask():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
            self.register_buffer("mask", torch.zeros(4, 1, 1).masked_fill(torch.arange(4)[:, None, None] > 1, -math.inf))

        def forward(self, x):
            return (self.bn(self.conv(x)) + self.mask).softmax(1)

    model = Masked().eval()
    export_onnx(model, (1, 1, 8, 8))  # a -inf mask is a constant the model means
    model.bn.running_var[0] = float("inf")
    with pytest.raises(UnsupportedModelError, match="'bn.running_var' holds 1 NaN or infinite"):
        export_onnx(model, (1, 1, 8, 8))
    model.bn.running_var[0] = 1.0
    model.mask[0] = float("nan")
    with pytest.raises(UnsupportedModelError, match="'mask' holds 1 NaN value"):
        export_onnx(model, (1, 1, 8, 8))
