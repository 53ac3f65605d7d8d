"""`sslcompress export` and `sslcompress surgery`: compact models, reports, refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from sslcompress.cli import main
from sslcompress.finetune.checkpoint import Checkpoint, save_checkpoint
from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery import compress as compress_mod
from sslcompress.surgery.prune import PruneResult


@pytest.fixture()
def sparse_ckpt(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("lenet5", 10, 1, (28, 28))
    m = build_model(spec)
    with torch.no_grad():
        m.conv1.weight[6:] = 0
        m.conv1.bias[6:] = 0
        m.fc1.weight[50:] = 0
        m.fc1.bias[50:] = 0
    path = tmp_path / "sparse.pt"
    save_checkpoint(path, Checkpoint("sparse", spec, m.state_dict()))
    return path


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def test_export_writes_compact_uncut_and_report(sparse_ckpt, tmp_path):
    out, uncut, rep = tmp_path / "c.onnx", tmp_path / "u.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(out), "--uncut", str(uncut),
                                    "--report", str(rep), "--dynamic-batch", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report == json.loads(rep.read_text())
    assert report["verification"]["passed"] and report["macs_after_matches_prediction"]
    dims = {i.name: list(i.dims) for i in onnx.load(out).graph.initializer}
    assert dims["conv1.weight"] == [6, 1, 5, 5] and dims["conv2.weight"] == [50, 6, 5, 5]
    assert dims["fc1.weight"] == [50, 800] and dims["fc2.weight"] == [10, 50]
    assert onnx.load(uncut).graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch kept


def test_surgery_on_an_onnx_file(sparse_ckpt, tmp_path):
    uncut, out = tmp_path / "u.onnx", tmp_path / "c.onnx"
    CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(tmp_path / "x.onnx"), "--uncut", str(uncut)])
    res = CliRunner().invoke(main, ["surgery", str(uncut), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "verification: passed" in res.output and out.is_file()


def test_failed_verification_writes_nothing_unless_forced(sparse_ckpt, tmp_path, monkeypatch):
    real = compress_mod.prune_dead_channels

    def broken(proto):
        res = real(proto)
        m = onnx.ModelProto()
        m.CopyFrom(res.model)
        bias = next(i for i in m.graph.initializer if i.name == "fc2.bias")
        arr = onnx.numpy_helper.to_array(bias).copy()
        arr[0] += 10.0
        bias.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), "fc2.bias"))
        return PruneResult(m, res.channels_removed, res.tensors_changed)

    monkeypatch.setattr(compress_mod, "prune_dead_channels", broken)
    out = tmp_path / "c.onnx"
    res = CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(out)])
    assert "nothing written" in _one_line_error(res)
    assert not out.exists()
    res = CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(out), "--force"])
    assert res.exit_code == 0 and out.exists() and "FAILED" in res.output


@pytest.mark.parametrize("content, words", [(None, "not found"), (b"\x00\x01garbage" * 20, "ONNX")])
def test_bad_onnx_input(tmp_path, content, words):
    src = tmp_path / "in.onnx"
    if content is not None:
        src.write_bytes(content)
    out = tmp_path / "out.onnx"
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out)])
    assert words in _one_line_error(res)
    assert not out.exists()


def test_truncated_onnx_input(sparse_ckpt, tmp_path):
    uncut = tmp_path / "u.onnx"
    CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(tmp_path / "x.onnx"), "--uncut", str(uncut)])
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(uncut.read_bytes()[:200])
    res = CliRunner().invoke(main, ["surgery", str(cut), "-o", str(tmp_path / "o.onnx")])
    _one_line_error(res)
    assert not (tmp_path / "o.onnx").exists()
