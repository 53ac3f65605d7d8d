"""The cut with `align`: widths left at multiples of N by keeping dead channels, still exact in ORT."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from sslcompress.cli import main
from sslcompress.errors import ConfigError
from sslcompress.finetune.checkpoint import Checkpoint, save_checkpoint
from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx


def _widths(proto: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(out, in) channels of every conv weight, by the conv's weight name."""
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    return {n.input[1]: tuple(inits[n.input[1]][:2]) for n in proto.graph.node if n.op_type == "Conv"}


@pytest.fixture(scope="module")
def uneven_resnet20() -> tuple[nn.Module, onnx.ModelProto]:
    """ResNet-20 with an uneven number of filters zeroed in each block's first conv and in stage 2's trunk,
    BatchNorm shifts random so that constants flow too."""
    torch.manual_seed(0)
    m = build_model(ModelSpec("resnet20", 10, 3, (16, 16))).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.bias.uniform_(-0.2, 0.2)
        for i, blk in enumerate([b for s in (m.layer1, m.layer2, m.layer3) for b in s]):
            k = 3 + 2 * i  # 3, 5, 7, ... filters zeroed: widths 13, 11, 9, ... (never a multiple of 8 alone)
            blk.conv1.weight[:k] = 0
            blk.bn1.weight[:k] = 0
            blk.bn1.bias[:k] = 0
        # Three trunk channels of stage 2 zero in every summand: the downsample, and every block's last BN.
        for blk in m.layer2:
            blk.bn2.weight[:3] = 0
            blk.bn2.bias[:3] = 0
        for mod in m.layer2[0].downsample:
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight[:3] = 0
                mod.bias[:3] = 0
    return m, export_onnx(m, (1, 3, 16, 16), dynamic_batch=True).model


@pytest.mark.parametrize("align", [8, 16, 5])
def test_widths_are_multiples_or_whole_and_outputs_unchanged(uneven_resnet20, align):
    m, proto = uneven_resnet20
    plain, aligned = compress(proto), compress(proto, align=align)
    assert plain.verification.passed and aligned.verification.passed
    full = _widths(proto)
    cut, kept = _widths(plain.model), _widths(aligned.model)
    assert set(kept) == set(full)
    for name, (o, i) in kept.items():
        for w, whole, least in ((o, full[name][0], cut[name][0]), (i, full[name][1], cut[name][1])):
            assert w % align == 0 or w == whole, (name, w, whole)
            # The fewest channels that make a multiple: never more than one step over the plain cut.
            assert least <= w < least + align or w == whole, (name, w, least)
    # Some widths moved, and the MACs sit between the plain cut and the dense model.
    assert cut != kept
    t_plain, t_aligned = plain.report["totals"], aligned.report["totals"]
    assert t_plain["macs_after"] < t_aligned["macs_after"] < t_aligned["macs"]
    assert aligned.report["align"] == align and plain.report["align"] is None
    assert sum(aligned.report["zeros_kept"].values()) > 0
    assert any(f"multiples of {align}" in why for why in aligned.report["zeros_kept"])
    # The same outputs as the uncut model, run here beside the check compress made itself.
    from sslcompress.runtime import create_session

    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    ref = create_session(proto.SerializeToString())
    got = create_session(aligned.model.SerializeToString())
    a = ref.run(None, {ref.get_inputs()[0].name: x})[0]
    b = got.run(None, {got.get_inputs()[0].name: x})[0]
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_align_one_is_the_plain_cut(uneven_resnet20):
    _, proto = uneven_resnet20
    assert _widths(compress(proto, align=1).model) == _widths(compress(proto).model)


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_bad_align_is_refused(uneven_resnet20, bad):
    with pytest.raises(ConfigError, match="align"):
        compress(uneven_resnet20[1], align=bad)


@pytest.fixture()
def uneven_lenet(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("lenet5", 10, 1, (28, 28))
    m = build_model(spec)
    with torch.no_grad():
        m.conv1.weight[7:] = 0  # 20 -> 7 filters
        m.conv1.bias[7:] = 0
        m.fc1.weight[45:] = 0  # 500 -> 45 neurons
        m.fc1.bias[45:] = 0
    path = tmp_path / "sparse.pt"
    save_checkpoint(path, Checkpoint("sparse", spec, m.state_dict()))
    return path


def test_export_align_keeps_more_than_the_checkpoint_counted_and_says_why(uneven_lenet, tmp_path):
    out, rep = tmp_path / "c.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(main, ["export", str(uneven_lenet), "--onnx", str(out), "--report", str(rep),
                                    "--align", "8"])
    assert res.exit_code == 0, res.output
    assert "widths kept at multiples of 8" in res.output and "verification: passed" in res.output
    report = json.loads(rep.read_text())
    assert report["align"] == 8 and not report["macs_after_matches_prediction"]
    dims = {i.name: list(i.dims) for i in onnx.load(out).graph.initializer}
    assert dims["conv1.weight"][0] == 8 and dims["conv2.weight"][1] == 8
    assert dims["fc1.weight"][0] == 48 and dims["fc2.weight"] == [10, 48]


def test_surgery_align_auto_reads_the_cpu_block(uneven_lenet, tmp_path):
    from sslcompress.latency.block import nchwc_block

    uncut = tmp_path / "u.onnx"
    CliRunner().invoke(main, ["export", str(uneven_lenet), "--onnx", str(tmp_path / "x.onnx"), "--uncut", str(uncut)])
    out, rep = tmp_path / "c.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(main, ["surgery", str(uncut), "-o", str(out), "--align", "auto", "--report", str(rep)])
    assert res.exit_code == 0, res.output
    block = nchwc_block("cpu")
    assert json.loads(rep.read_text())["align"] == block
    width = {i.name: list(i.dims) for i in onnx.load(out).graph.initializer}["conv1.weight"][0]
    assert width == -(-7 // block) * block


@pytest.mark.parametrize("value", ["0", "eight", "-4"])
def test_bad_align_option_is_one_line(uneven_lenet, tmp_path, value):
    out = tmp_path / "c.onnx"
    res = CliRunner().invoke(main, ["export", str(uneven_lenet), "--onnx", str(out), "--align", value])
    assert res.exit_code == 2 and "--align" in res.output, res.output
    assert not out.exists()


def test_shape_lowering_leaves_the_channels_alignment_kept():
    # Channel sparsity: conv2 reads one of conv1's 20 channels. Aligned to 8, conv2 keeps 7 channels whose
    # columns are all zero (87.5% of its columns); predict lowers convs from 75%, which would undo the
    # alignment with an im2col of the one channel. Those whole zero channels count as kept.
    torch.manual_seed(0)
    m = build_model(ModelSpec("lenet5", 10, 1, (28, 28))).eval()
    with torch.no_grad():
        m.conv2.weight[:, 1:] = 0
    proto = export_onnx(m, (1, 1, 28, 28)).model
    res = compress(proto, align=8, shape_lowering="predict")
    assert res.verification.passed
    assert _widths(res.model)["conv2.weight"] == (50, 8)
    assert not any(d["lowered"] for d in res.report["shape_lowering"].get("convs", []))
    assert "MatMul" not in {n.op_type for n in res.model.graph.node}
    # Without alignment the plain cut deletes the 19 channels: conv2 reads one, nothing to lower either.
    assert _widths(compress(proto, shape_lowering="predict").model)["conv2.weight"] == (50, 1)


@pytest.mark.parametrize(("attention", "exporter", "opset"), [("mha", "legacy", 17), ("separate", "dynamo", 18)])
def test_transformer_mlp_widths_align_exactly(attention, exporter, opset):
    # Five dead MLP neurons (zero rows, constant rows, a zero column) of a transformer block from torch's
    # legacy and dynamo exporters: the plain cut keeps 4d - 5, aligned to 8 the hidden width rounds up.
    from test_transformer_surgery import NEURONS, assert_exact, block, export, feeds, mlp_widths, zero_neurons

    m = block(attention=attention)
    for how, neurons in NEURONS.items():
        zero_neurons(m, neurons, how)
    proto = export(m, exporter, opset)
    plain = compress(proto, inputs=[feeds(proto, m.d, 2)], shape_lowering="off")
    aligned = compress(proto, inputs=[feeds(proto, m.d, 2)], shape_lowering="off", align=8)
    assert plain.verification.passed and aligned.verification.passed
    hidden = mlp_widths(plain.model, m.d)[0]
    assert hidden % 8 != 0
    assert mlp_widths(aligned.model, m.d) == (-(-hidden // 8) * 8,) * 2
    assert_exact(proto, aligned.model, m.d)
