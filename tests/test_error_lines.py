"""Every error is one `error: ...` line naming what the user typed: click's usage errors, ONNX Runtime's
failures (without its own log lines), torch's refusal of pickled objects, a model that was cut before
training. Checked on the real process's stderr where a library writes to the file descriptor itself."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from sslcompress.cli import main
from sslcompress.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sslcompress.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def _only_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: "), text
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["finetune", "--bogus"], ["sslcompress finetune:", "--bogus", "did you mean", "'sslcompress finetune --help'"]),
    (["finetune", "--epochs", "3"], ["--epochs", "--sparsify-epochs"]),
    (["finetune", "--batch-size", "0"], ["--batch-size", "0"]),
    (["finetune", "--seed", "x"], ["--seed", "'x'"]),
    (["finetune", "--method", "l2"], ["--method", "'l2'"]),
    (["surgery"], ["sslcompress surgery:", "missing argument 'MODEL'"]),
    (["export", "a.pt"], ["--onnx"]),
    (["bench", "--provider"], ["--provider", "requires an argument"]),
    (["nosuch"], ["sslcompress:", "no such command 'nosuch'"]),
    (["info"], ["missing argument"]),
])
def test_usage_errors_are_one_line(args, words):
    res = CliRunner().invoke(main, args, prog_name="sslcompress")
    assert res.exit_code == 2, res.output
    line = _only_line(res.output)
    for w in words:
        assert w.lower() in line.lower(), line


def test_help_and_version_still_work():
    assert CliRunner().invoke(main, ["--version"]).exit_code == 0
    res = CliRunner().invoke(main, ["finetune", "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output


@pytest.fixture(scope="module")
def reshape_fails_at_batch_2(tmp_path_factory):
    """Loads fine; ORT fails at run time for any batch but 1, logging its own line first unless told not to."""
    path = tmp_path_factory.mktemp("ort") / "reshape.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 4])
    target = numpy_helper.from_array(np.array([1, 4], np.int64), "target")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "target"], ["y"])], "g", [x], [y], [target])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_ort_failures_come_without_ort_log_lines(reshape_fails_at_batch_2, tmp_path):
    for args in (["bench", str(reshape_fails_at_batch_2), "--batch", "2", "--threads", "1", "-q"],
                 ["surgery", str(reshape_fails_at_batch_2), "-o", str(tmp_path / "c.onnx")]):
        proc = _cli(*args)
        assert proc.returncode == 2, proc.stderr
        line = _only_line(proc.stderr)
        assert "[E:onnxruntime" not in proc.stderr and "onnxruntime_src" not in line
        assert "cannot be reshaped" in line and "[ONNXRuntimeError]" not in line
    assert not (tmp_path / "c.onnx").exists()


def test_model_ort_cannot_load_is_one_line(tmp_path):
    node = helper.make_node("FooOp", ["x"], ["y"], domain="custom.ops")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("custom.ops", 1)]), path)
    proc = _cli("bench", str(path), "--threads", "1", "-q")
    assert proc.returncode == 2
    assert "custom.ops:FooOp" in _only_line(proc.stderr)


class _NotWeights:
    pass


@pytest.mark.parametrize("command", ["info", "export", "finetune"])
def test_pickled_objects_are_named_without_torchs_advice(tmp_path, command):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": _NotWeights()}, path)
    args = {"info": ["info", str(path)],
            "export": ["export", str(path), "--onnx", str(tmp_path / "m.onnx")],
            "finetune": ["finetune", "--weights", str(path), "--out", str(tmp_path / "run"), "-q"]}[command]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    line = _only_line(res.output)
    assert str(path) in line and "_NotWeights" in line and "state_dict" in line
    assert "weights_only" not in line and "trust" not in line and "\x1b" not in line and len(line) < 400


def test_a_model_cut_before_training_is_not_blamed_on_the_strength(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelSpec("lenet5", 10, 1, (28, 28)))
    state = model.state_dict()
    state["conv2.weight"].zero_()
    state["conv2.bias"].zero_()
    weights = tmp_path / "cut.pt"
    torch.save(state, weights)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["finetune", "--weights", str(weights), "--limit-train", "64", "--limit-test",
                                    "32", "--threads", "1", "-q", "--out", str(out)])
    assert res.exit_code == 2
    line = _only_line(res.output)
    assert str(weights) in line and "before sparsify" in line and "strength" not in line
    assert not out.exists()
