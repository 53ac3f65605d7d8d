"""A module called more than once costs MACs at every call, so --target-flops steers the number the exported
model computes; `export` refuses a checkpoint whose count disagrees with its ONNX model."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from zeroing import zero_groups

from sslcompress import compress, export_onnx
from sslcompress.cli import main
from sslcompress.finetune.checkpoint import Checkpoint, save_checkpoint
from sslcompress.finetune.groups import build_groups
from sslcompress.flops import count
from sslcompress.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 3, 16, 16)


class Twice(nn.Module):
    """One conv applied twice (weights shared), then pooled into a classifier applied twice too."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 8)
        self.out = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.down(x))
        x = F.relu(self.shared(x))  # again, on a quarter of the positions
        x = x.mean((2, 3))
        return self.out(F.relu(self.head(F.relu(self.head(x)))))


def _onnx_totals(model):
    return compress(export_onnx(model.eval(), SHAPE).model).report["totals"]


def test_every_call_counts_its_macs():
    torch.manual_seed(0)
    model = Twice().eval()
    counted = count(model, SHAPE)
    # shared: 8*8*9 weights at 16x16 and at 8x8 positions; head: 8*8 twice.
    assert counted.layer("shared").macs == 8 * 8 * 9 * (16 * 16 + 8 * 8)
    assert counted.layer("head").macs == 2 * 8 * 8
    assert counted.macs == _onnx_totals(model)["macs"]


def test_zero_filters_of_a_shared_module_are_counted_at_every_call():
    torch.manual_seed(0)
    model = Twice().eval()
    with torch.no_grad():
        # Filters 0-2 of `shared` and of what feeds its first call (its input channels are one with the
        # second call's, which `shared` itself produces): zero, so their channels go at both calls.
        for m in (model.stem, model.shared, model.down):
            m.weight[:3] = 0
            m.bias[:3] = 0
    counted = count(model, SHAPE)
    totals = _onnx_totals(model)
    assert counted.macs_after < counted.macs
    # The ONNX surgery may cut more (it can give each call its own copy of the weights), never less.
    assert totals["macs_after"] <= counted.macs_after


def test_groups_of_a_shared_module_stay_exact():
    torch.manual_seed(0)
    model = Twice().eval()
    groups = {g.name: g for g in build_groups(model, SHAPE, ("filter",)) if g.removable}
    # Zeroing a removable filter group never changes the output more than removing it would: check that
    # every removable group, zeroed, leaves an exact cut in ONNX.
    for g in groups.values():
        probe = Twice().eval()
        probe.load_state_dict(model.state_dict())
        zero_groups(probe, [g])
        result = compress(export_onnx(probe, SHAPE).model)
        assert result.verification.passed, g.name
        assert result.report["totals"]["macs_after"] <= count(probe, SHAPE).macs_after, g.name


USER_MODEL = textwrap.dedent("""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Functional(nn.Module):
        # A conv written with F.conv2d on a parameter no conv module holds: a wall, counted as ONNX computes it.
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.extra = nn.Parameter(torch.randn(4, 4, 3, 3))
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            x = F.relu(F.conv2d(F.relu(self.conv(x)), self.extra))
            return self.fc(x.mean((2, 3)))

    def functional():
        return Functional()
""")


def _functional_checkpoint(tmp_path):
    (tmp_path / "user.py").write_text(USER_MODEL)
    spec = ModelSpec(f"{tmp_path / 'user.py'}:functional", 10, 1, (12, 12))
    torch.manual_seed(0)
    model = build_model(spec)
    save_checkpoint(tmp_path / "m.pt", Checkpoint("sparse", spec, model.state_dict()))
    return tmp_path / "m.pt"


def test_a_conv_written_with_f_conv2d_is_counted_as_exported(tmp_path):
    checkpoint, out = _functional_checkpoint(tmp_path), tmp_path / "c.onnx"
    res = CliRunner().invoke(main, ["export", str(checkpoint), "--onnx", str(out)])
    assert res.exit_code == 0, res.output
    assert "MACs after match the checkpoint's count" in res.output and out.exists()


def test_export_refuses_a_count_the_onnx_model_disagrees_with(tmp_path, monkeypatch):
    import dataclasses

    import sslcompress.flops

    real = sslcompress.flops.count

    def missing_an_op(model, shape):  # as a count that misses an op the export computes would
        counted = real(model, shape)
        return dataclasses.replace(counted, macs=counted.macs - 1000, macs_after=counted.macs_after - 1000)

    monkeypatch.setattr(sslcompress.flops, "count", missing_an_op)
    checkpoint, out = _functional_checkpoint(tmp_path), tmp_path / "c.onnx"
    res = CliRunner().invoke(main, ["export", str(checkpoint), "--onnx", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "the checkpoint's count says" in lines[0] and "--force" in lines[0]
    assert not out.exists()
    res = CliRunner().invoke(main, ["export", str(tmp_path / "m.pt"), "--onnx", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert out.exists()


class Upsampling(nn.Module):
    """An encoder-decoder step: F.interpolate and nn.Upsample resample each channel alone."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        x = F.relu(self.enc(x))
        x = F.interpolate(F.relu(self.mid(x)), scale_factor=2.0, mode="bilinear", align_corners=False)
        x = F.relu(self.dec(self.up(F.max_pool2d(x, 2))))
        return self.fc(x.mean((2, 3)))


def test_interpolated_channels_are_removable_and_cut_exactly():
    torch.manual_seed(0)
    model = Upsampling().eval()
    removable = {g.name for g in build_groups(model, SHAPE, ("filter",)) if g.removable}
    assert any(n.startswith("filter mid[") for n in removable) and any(n.startswith("filter enc[") for n in removable)
    with torch.no_grad():
        model.mid.weight[:4] = 0
        model.mid.bias[:4] = 0
    counted = count(model, SHAPE)
    result = compress(export_onnx(model, SHAPE).model)
    assert result.verification.passed
    assert counted.macs == result.report["totals"]["macs"]
    assert counted.macs_after == result.report["totals"]["macs_after"] < counted.macs


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, depthwise 3x3, 1x1 project, with BatchNorm and a residual."""

    def __init__(self, c: int = 8, expand: int = 4):
        super().__init__()
        hidden = c * expand
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.expand = nn.Conv2d(c, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.dw_biased = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        x = x + self.bn3(self.project(y))
        x = F.relu(self.dw_biased(x))
        return self.fc(x.mean((2, 3)))


def _random_bn(model):
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def test_depthwise_channels_are_removable_and_cut_exactly():
    torch.manual_seed(0)
    model = InvertedResidual().eval()
    with torch.no_grad():
        _random_bn(model)
    filters = [g for g in build_groups(model, SHAPE, ("filter",)) if g.removable]
    hidden = [g for g in filters if g.name.startswith("filter expand[")]
    assert len(hidden) == 32  # every hidden channel of the block, its depthwise filter with it
    assert all({"expand.weight", "dw.weight", "bn1.weight", "bn2.bias"} <= {s.param for s in g.slices} for g in hidden)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for g in hidden[::2] + [g for g in filters if g.name.startswith("filter stem[")][:1]:
            for s in g.slices:
                params[s.param][list(s.index)] = 0
    counted = count(model, SHAPE)
    assert counted.layer("dw").filters == (16, 32)
    result = compress(export_onnx(model, SHAPE).model)
    assert result.verification.passed
    assert counted.macs == result.report["totals"]["macs"]
    assert counted.macs_after == result.report["totals"]["macs_after"] < counted.macs


def test_a_depthwise_bias_keeps_its_channel_alive():
    torch.manual_seed(0)
    model = InvertedResidual().eval()
    groups = [g for g in build_groups(model, SHAPE, ("filter",)) if g.removable]
    stem0 = next(g for g in groups if g.name.startswith("filter stem[0]"))
    assert {"dw_biased.weight", "dw_biased.bias"} <= {s.param for s in stem0.slices}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for s in stem0.slices:
            if s.param != "dw_biased.bias":
                params[s.param][list(s.index)] = 0
    counted = count(model, SHAPE)
    assert counted.layer("dw_biased").filters == (8, 8)  # bias 0 nonzero: the channel is a constant, kept
    result = compress(export_onnx(model, SHAPE).model)
    assert result.verification.passed
    assert result.report["totals"]["macs_after"] <= counted.macs_after


class SqueezeExcite(nn.Module):
    """A conv gated by squeeze-and-excitation: as 1x1 convs (MobileNetV3, EfficientNet) or as Linears."""

    def __init__(self, linear: bool):
        super().__init__()
        self.linear = linear
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        if linear:
            self.fc1, self.fc2 = nn.Linear(16, 4), nn.Linear(4, 16)
        else:
            self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.gate = nn.Sigmoid()
        self.head = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.conv(x))
        if self.linear:
            s = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
            x = x * self.gate(s).view(s.shape[0], 16, 1, 1)
        else:
            s = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
            x = x * torch.sigmoid(s)
        x = F.relu(self.head(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("linear", [False, True])
def test_squeeze_excite_gated_channels_are_removable_and_cut_exactly(linear):
    torch.manual_seed(0)
    model = SqueezeExcite(linear).eval()
    groups = [g for g in build_groups(model, SHAPE, ("filter",)) if g.removable]
    gated = [g for g in groups if g.name.startswith("filter conv[")]
    assert len(gated) == 16  # every gated channel, its excitation row with it
    assert all({"conv.weight", "fc2.weight", "fc2.bias"} <= {s.param for s in g.slices} for g in gated)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for g in gated[:10]:
            for s in g.slices:
                params[s.param][list(s.index)] = 0
    counted = count(model, SHAPE)
    assert counted.layer("conv").filters == (6, 16) and counted.layer("fc2").filters == (6, 16)
    result = compress(export_onnx(model, SHAPE).model)
    assert result.verification.passed
    assert counted.macs == result.report["totals"]["macs"]
    assert result.report["totals"]["macs_after"] <= counted.macs_after < counted.macs


def test_a_sigmoid_read_elsewhere_stays_a_wall():
    class Leaky(SqueezeExcite):
        def forward(self, x):
            x = F.relu(self.conv(x))
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
            x = x * s + s  # the gate also added: sigmoid(0) = 0.5 would survive a deleted channel
            return self.fc(F.relu(self.head(x)).mean((2, 3)))

    model = Leaky(False).eval()
    assert not [g for g in build_groups(model, SHAPE, ("filter",)) if g.removable and g.name.startswith("filter conv[")]


def test_export_of_emptied_swiglu_mlps_whose_equal_zero_weights_the_exporter_shares(tmp_path):
    """Two blocks' SwiGLU MLPs zeroed whole: the exporter shares one initializer among the equal (zero) gate,
    up and down weights and the simplifier computes gate and up once, so the uncut export computes less
    than the dense count, by less than the checkpoint removes. That is accepted, and the cut verifies."""
    import onnx

    spec = ModelSpec("llama_vit_tiny", 10, 1, (28, 28))
    torch.manual_seed(0)
    model = build_model(spec).eval()

    def matmuls(m: onnx.ModelProto) -> int:
        return sum(n.op_type in ("MatMul", "Gemm") for n in m.graph.node)

    dense = matmuls(export_onnx(model, spec.input_shape).model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.startswith(f"blocks.{b}.mlp.") or name == f"blocks.{b}.norm2.weight" for b in (4, 5)):
                p.zero_()
    save_checkpoint(tmp_path / "m.pt", Checkpoint("sparse", spec, model.state_dict()))
    out, uncut = tmp_path / "c.onnx", tmp_path / "u.onnx"
    res = CliRunner().invoke(main, ["export", str(tmp_path / "m.pt"), "--onnx", str(out), "--uncut", str(uncut)])
    assert res.exit_code == 0, res.output
    assert "MACs after match the checkpoint's count" in res.output
    # The case this test is about: the uncut export computes fewer products than the dense model's.
    assert matmuls(onnx.load(str(uncut))) < dense


def test_the_dense_count_may_exceed_the_export_only_by_what_the_checkpoint_removes_whole():
    from sslcompress.cli.cut import _check_prediction
    from sslcompress.errors import VerificationError

    _check_prediction(1000, 500, {"macs": 900, "macs_after": 500}, False, removed=100)
    with pytest.raises(VerificationError, match="checkpoint's count says 1000"):
        _check_prediction(1000, 500, {"macs": 900, "macs_after": 500}, False, removed=99)
    with pytest.raises(VerificationError, match="checkpoint's count says 1000"):
        _check_prediction(1000, 500, {"macs": 1001, "macs_after": 500}, False, removed=500)
