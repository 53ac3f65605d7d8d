"""A module called more than once costs MACs at every call, so --target-flops steers the number the exported
model computes; `export` refuses a checkpoint whose count disagrees with its ONNX model."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

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
        params = dict(probe.named_parameters())
        with torch.no_grad():
            for s in g.slices:
                p = params[s.param]
                if s.axis == "out":
                    p[list(s.index)] = 0
                elif s.axis == "in":
                    p[:, list(s.index)] = 0
        result = compress(export_onnx(probe, SHAPE).model)
        assert result.verification.passed, g.name
        assert result.report["totals"]["macs_after"] <= count(probe, SHAPE).macs_after, g.name


USER_MODEL = textwrap.dedent("""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Functional(nn.Module):
        # A conv written with F.conv2d: ONNX computes it, the training's count does not see it.
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


def test_export_refuses_a_count_the_onnx_model_disagrees_with(tmp_path):
    (tmp_path / "user.py").write_text(USER_MODEL)
    spec = ModelSpec(f"{tmp_path / 'user.py'}:functional", 10, 1, (12, 12))
    torch.manual_seed(0)
    model = build_model(spec)
    save_checkpoint(tmp_path / "m.pt", Checkpoint("sparse", spec, model.state_dict()))
    out = tmp_path / "c.onnx"
    res = CliRunner().invoke(main, ["export", str(tmp_path / "m.pt"), "--onnx", str(out)])
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
