"""`sslcompress export` and `sslcompress surgery`: compact models, reports, refusals."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from sslcompress.cli import main
from sslcompress.finetune.checkpoint import Checkpoint, save_checkpoint
from sslcompress.models import ModelSpec, build_model


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


def test_failed_verification_writes_nothing_unless_forced(sparse_ckpt, tmp_path, broken_surgery):
    out = tmp_path / "c.onnx"
    res = CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(out)])
    line = _one_line_error(res)
    assert "nothing written" in line and "first at node '/fc2/Gemm' (Gemm, output 'output')" in line
    assert not out.exists()
    res = CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(out), "--force"])
    assert res.exit_code == 0 and out.exists() and "FAILED" in res.output
    assert "first diverging node '/fc2/Gemm'" in res.output


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


@pytest.fixture(scope="module")
def lenet_onnx(tmp_path_factory):
    """A small sparse LeNet as ONNX bytes, for corrupting in many ways."""
    from sslcompress.surgery.export import export_onnx

    torch.manual_seed(0)
    m = build_model(ModelSpec("lenet5", 10, 1, (28, 28)))
    with torch.no_grad():
        m.conv1.weight[6:] = 0
    return export_onnx(m, (1, 1, 28, 28)).model


def _bad_model(kind: str, good: onnx.ModelProto) -> bytes | None:
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    if kind == "missing":
        return None
    if kind == "text":
        return b"this is a text file, not a model\n"
    if kind == "truncated":
        return good.SerializeToString()[:300]
    if kind == "opset":
        bad.opset_import[0].version = 99
    elif kind == "ir":
        bad.ir_version = 99
    elif kind == "dynamic":
        dims = bad.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
        del bad.graph.value_info[:]
    return bad.SerializeToString()


@pytest.mark.parametrize("kind, words", [
    ("missing", "not found"), ("text", "not a readable ONNX model"), ("truncated", "truncated"),
    ("opset", "opset 99, newer than"), ("ir", "ir_version 99 is higher"), ("dynamic", "dynamic dimension 2"),
])
@pytest.mark.parametrize("existing", [False, True])
def test_bad_model_one_line_and_nothing_written(lenet_onnx, tmp_path, kind, words, existing):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    content = _bad_model(kind, lenet_onnx)
    if content is not None:
        src.write_bytes(content)
    if existing:
        out.write_bytes(b"an older model")
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out)])
    assert words in _one_line_error(res)
    if existing:
        assert out.read_bytes() == b"an older model"
    else:
        assert not out.exists()
    expected = {"in.onnx"} if content is not None else set()
    assert {p.name for p in tmp_path.iterdir()} == expected | ({"out.onnx"} if existing else set()), "no stray files"


def test_dynamic_spatial_model_verifies_with_data(lenet_onnx, tmp_path):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(_bad_model("dynamic", lenet_onnx))
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out), "--data", "digits", "--data-limit", "3",
                                    "--json"])
    assert res.exit_code == 0, res.output
    v = json.loads(res.output)["verification"]
    assert v["passed"] and v["real_images"] == 3 and v["inputs"] == 4 + 3


def test_dynamic_spatial_model_verifies_at_an_input_shape(lenet_onnx, tmp_path):
    """No data of the model's size at hand (a detector's 640x640): random inputs of the size given verify it, and
    the compact model keeps its free height and width."""
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(_bad_model("dynamic", lenet_onnx))
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out)])
    assert "or give random ones a size (--input-shape C,H,W" in _one_line_error(res)
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out), "--input-shape", "1,28,28", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["verification"]["passed"] and report["verification"]["inputs"] == 4
    assert report["input_sizes"] == {"height": 28, "width": 28}
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["height", "width"]
    for shape, words in (("3,28,28", "does not fit input"), ("28,28", "gives 2 sizes"), ("1,a,28", "positive sizes")):
        res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out), "--input-shape", shape])
        assert words in _one_line_error(res), shape


def test_surgery_with_real_data(lenet_onnx, tmp_path):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(lenet_onnx.SerializeToString())
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out), "--data", "digits", "--data-limit", "7"])
    assert res.exit_code == 0, res.output
    assert "real images: 7 from digits, top-1 agreement 100.00%" in res.output
    assert out.is_file()


@pytest.mark.parametrize("spec, words", [
    ("synthetic:3x32x32:10", "3x32x32 images but the model's input 'input' is 1x28x28"),
    ("mnist:/no/such/file.npz", "/no/such/file.npz not found"),
    ("nope", "unknown data set kind"),
])
def test_bad_data_is_one_line(lenet_onnx, tmp_path, spec, words):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(lenet_onnx.SerializeToString())
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out), "--data", spec])
    assert words in _one_line_error(res)
    assert not out.exists()


def test_export_with_data_and_input_shape(tmp_path):
    spec = ModelSpec("resnet20", 10, 3, (32, 32))
    torch.manual_seed(0)
    ckpt = tmp_path / "r.pt"
    save_checkpoint(ckpt, Checkpoint("sparse", spec, build_model(spec).state_dict()))
    out = tmp_path / "c.onnx"
    res = CliRunner().invoke(main, ["export", str(ckpt), "--onnx", str(out), "--input-shape", "3,16,16",
                                    "--dynamic-batch", "--data", "synthetic:3x16x16:10", "--data-limit", "5",
                                    "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["input_shape"] == [1, 3, 16, 16] and report["data"] == "synthetic:3x16x16:10"
    v = report["verification"]
    assert v["passed"] and v["real_images"] == 5 and v["real_top1_agreement"] == 1.0
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 16, 16]


@pytest.mark.parametrize("shape, words", [
    ("3,32", "three positive integers"), ("0,28,28", "three positive integers"),
    ("a,b,c", "three positive integers"), ("1,28,28,1", "three positive integers"),
    ("3,28,28", "cannot run on --input-shape 3,28,28"), ("1,32,32", "cannot run on --input-shape 1,32,32"),
])
def test_bad_input_shape_is_one_line(sparse_ckpt, tmp_path, shape, words):
    out = tmp_path / "c.onnx"
    res = CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(out), "--input-shape", shape])
    assert words in _one_line_error(res)
    assert not out.exists()


def test_export_data_shape_mismatch(sparse_ckpt, tmp_path):
    out = tmp_path / "c.onnx"
    res = CliRunner().invoke(main, ["export", str(sparse_ckpt), "--onnx", str(out), "--data", "synthetic:1x32x32:10"])
    assert "1x32x32 images but the model's input 'input' is 1x28x28" in _one_line_error(res)
    assert not out.exists()


def test_export_names_the_branches_it_replaced_by_their_constant(tmp_path):
    # A ResNet-20 block whose first conv's filters are all zero: its branch computes a constant per channel.
    torch.manual_seed(0)
    spec = ModelSpec("resnet20", 10, 3, (32, 32))
    m = build_model(spec).eval()
    with torch.no_grad():
        m.layer2[1].bn2.bias.uniform_(-0.5, 0.5)
        for p in (m.layer2[1].conv1.weight, m.layer2[1].bn1.weight, m.layer2[1].bn1.bias):
            p.zero_()
    path = tmp_path / "sparse.pt"
    save_checkpoint(path, Checkpoint("sparse", spec, m.state_dict()))
    out, rep = tmp_path / "c.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(main, ["export", str(path), "--onnx", str(out), "--report", str(rep)])
    assert res.exit_code == 0, res.output
    assert "residual branches removed 0 (and 1 replaced by their constant)" in " ".join(res.output.split())
    assert json.loads(rep.read_text())["blocks_constant"] == ["/layer2/layer2.1/Add"]
