"""The counter predicts what the surgery keeps when a residual branch's first conv dies whole: the branch
then adds a constant per channel (its second conv's bias, through its norm), the surgery adds that constant
instead and deletes both convs, and the counter counts the same."""

from __future__ import annotations

import pytest
import torch

from sslcompress.finetune.counting import count
from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


def _resnet(zeroed: tuple[str, ...], blocks: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet20", 10, 3, (32, 32))).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # BN that does something, so a constant branch is not zero
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
        for b in range(blocks):
            for name in zeroed:
                m = model.get_submodule(f"layer1.{b}.{name}")
                m.weight.zero_()
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
    return model


@pytest.mark.parametrize("zeroed, blocks_removed", [
    (("conv1", "bn1"), 0),  # the first conv dies: the branch computes a constant, which replaces it
    (("conv1", "bn1", "conv2", "bn2"), 3),  # the whole branch is zero: the block goes
])
def test_counted_macs_equal_the_cut_onnx_models(zeroed, blocks_removed):
    model = _resnet(zeroed)
    counted = count(model, (1, 3, 32, 32))
    assert len(counted.blocks_removed) == blocks_removed
    result = compress(export_onnx(model, (1, 3, 32, 32)).model)
    assert result.report["verification"]["passed"]
    assert result.report["totals"]["macs_after"] == counted.macs_after
    assert counted.macs_after < counted.macs


def test_thinning_a_dead_branch_beside_a_projection_keeps_it_a_branch():
    # A block whose whole residual branch is zero, beside a 1x1 projection shortcut: thinning leaves one
    # channel inside the branch, which then weighs less than the projection. The branch must still be the
    # branch (the depth group, removed), so the thinned model counts what the unthinned one counts.
    from sslcompress.finetune.groups import build_groups
    from sslcompress.finetune.structure import analyze
    from sslcompress.finetune.thin import thin

    model = _resnet(())
    shape = (1, 3, 32, 32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for g in build_groups(model, shape, ("depth",)):
            if g.name == "depth layer2.0":
                for s in g.slices:
                    params[s.param].zero_()
    before = count(model, shape)
    thin(model, shape)
    assert model.layer2[0].conv1.out_channels == 1
    branches = [b.modules for b in analyze(model, shape).branches]
    assert ["layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2", "layer2.0.bn2"] in branches
    after = count(model, shape)
    assert after.macs_after == before.macs_after
    assert "layer2.0" in after.blocks_removed


class _GroupNormBlock(torch.nn.Module):
    def __init__(self, c: int, norm) -> None:
        super().__init__()
        self.conv1, self.gn1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)
        self.conv2, self.gn2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(x))))))


class _GroupNormNet(torch.nn.Module):
    """A residual net normalised by GroupNorm (as detection backbones are) or InstanceNorm (as image-to-image
    nets are): its blocks are depth groups too."""

    def __init__(self, norm) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b1, self.b2 = _GroupNormBlock(16, norm), _GroupNormBlock(16, norm)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(self.b1(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("norm", [lambda c: torch.nn.GroupNorm(4, c), lambda c: torch.nn.InstanceNorm2d(c, affine=True)],
                         ids=["group", "instance"])
@torch.no_grad()
def test_a_group_or_instance_norm_block_is_a_depth_group_counted_as_cut(norm):
    from sslcompress.finetune.groups import build_groups

    torch.manual_seed(0)
    model, shape = _GroupNormNet(norm).eval(), (1, 3, 16, 16)
    assert [g.name for g in build_groups(model, shape, ("depth",))] == ["depth b1", "depth b2"]
    for p in model.b1.parameters():
        p.zero_()  # with its GroupNorms' scales and shifts: the branch writes zero
    counted = count(model, shape)
    result = compress(export_onnx(model, shape).model)
    assert result.verification.passed
    assert counted.blocks_removed == ("b1",) and result.report["blocks_removed"] == ["/b1/Add"]
    assert result.report["totals"]["macs_after"] == counted.macs_after < counted.macs


class _DifferenceNet(torch.nn.Module):
    """Residuals written as differences: ``x - branch(x)`` (zero branch: x), and ``branch(x) - x`` (zero
    branch: -x, no bypass)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                      torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1))
        self.b2 = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                                      torch.nn.Conv2d(16, 16, 3, padding=1))
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x - self.b1(x))
        x = torch.relu(self.b2(x) - x)
        return self.head(x.mean((2, 3)))


@torch.no_grad()
def test_a_subtracted_branch_is_a_depth_group_and_a_subtracting_one_is_not():
    from sslcompress.finetune.groups import build_groups

    torch.manual_seed(0)
    model, shape = _DifferenceNet().eval(), (1, 3, 16, 16)
    assert [g.name for g in build_groups(model, shape, ("depth",))] == ["depth b1"]
    for p in list(model.b1.parameters()) + list(model.b2.parameters()):
        p.zero_()
    counted = count(model, shape)
    result = compress(export_onnx(model, shape).model)
    assert result.verification.passed
    assert counted.blocks_removed == ("b1",) and result.report["blocks_removed"] == ["/Sub"]
    # b2 computes zero and stays a Sub (0 - x), its convs cut to nothing but what the Sub needs.
    assert result.report["totals"]["macs_after"] == counted.macs_after < counted.macs


@torch.no_grad()
def test_a_subtracted_constant_branch_becomes_its_negated_shift():
    torch.manual_seed(0)
    model, shape = _DifferenceNet().eval(), (1, 3, 16, 16)
    for p in (model.b1[0].weight, model.b1[0].bias, model.b1[1].weight, model.b1[1].bias):
        p.zero_()  # b1's last conv reads zeros and writes its bias: the branch is a constant per channel
    assert model.b1[3].bias.abs().min() > 0
    counted = count(model, shape)
    result = compress(export_onnx(model, shape).model)
    assert result.verification.passed
    assert result.report["blocks_constant"] == ["/Sub"]
    assert result.report["totals"]["macs_after"] == counted.macs_after < counted.macs


@pytest.mark.parametrize(("arch", "side"), [("resnet20", 32), ("resnet18", 64), ("convnext_cifar", 32),
                                            ("vit_tiny", 32)])
@torch.no_grad()
def test_every_other_depth_group_zeroed_is_counted_as_cut(arch, side):
    # Whichever blocks a depth-wise run zeroes, the count the budget steers by is what the export keeps.
    from sslcompress.finetune.groups import build_groups

    torch.manual_seed(0)
    model, shape = build_model(ModelSpec(arch, 10, 3, (side, side))).eval(), (1, 3, side, side)
    for p in model.parameters():
        if p.dim() == 1:  # biases and norm parameters that do something
            p.uniform_(-0.5, 0.5)
    groups = build_groups(model, shape, ("depth",))
    assert len(groups) >= 2
    params = dict(model.named_parameters())
    for g in groups[::2]:
        for s in g.slices:
            params[s.param].zero_()
    counted = count(model, shape)
    result = compress(export_onnx(model, shape).model)
    assert result.verification.passed
    assert len(result.report["blocks_removed"]) == len(counted.blocks_removed) == len(groups[::2])
    assert result.report["totals"]["macs_after"] == counted.macs_after < counted.macs


@pytest.mark.parametrize("exporter", ["dynamo", "dynamo-dynamic", "legacy-dynamic", "legacy-opset11"])
@torch.no_grad()
def test_a_subtracted_zero_branch_goes_in_foreign_exports(exporter):
    import numpy as np
    import onnxruntime as ort
    from corpus import torch_models as T

    torch.manual_seed(0)
    model = _DifferenceNet().eval()
    for p in model.b1.parameters():
        p.zero_()
    proto = {"dynamo": lambda: T.dynamo(model), "dynamo-dynamic": lambda: T.dynamo(model, dynamic=(0, 2, 3)),
             "legacy-dynamic": lambda: T.legacy(model, dynamic=(0, 2, 3)),
             "legacy-opset11": lambda: T.legacy(model, opset=11)}[exporter]()
    batch = 1 if exporter == "legacy-opset11" else 2
    rng = np.random.default_rng(0)
    result = compress(proto, inputs=[rng.standard_normal((batch, 3, T.SIDE, T.SIDE)).astype(np.float32)])
    assert result.verification.passed
    assert len(result.report["blocks_removed"]) == 1 and result.report["zero_branches_kept"] == {}
    x = rng.standard_normal((batch, 3, T.SIDE, T.SIDE)).astype(np.float32)
    outs = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for p in (proto, result.model)]
    assert np.abs(outs[0] - outs[1]).max() <= 1e-5 * np.abs(outs[0]).max()


class _TokensToNextStage(torch.nn.Module):
    """SegFormer's and PVT's stage boundary: tokens (B, H*W, C), a LayerNorm, reshaped to (B, H, W, C) and
    permuted to (B, C, H, W) for the next stage's patch-embedding conv."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, 4, 4)
        self.norm = torch.nn.LayerNorm(8)
        self.embed2 = torch.nn.Conv2d(8, 16, 3, 2, 1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.embed(x)
        b, c, h, w = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        return self.head(self.embed2(x).mean((2, 3)))


def test_a_conv_on_tokens_reshaped_channels_last_and_permuted_is_counted():
    torch.manual_seed(0)
    model = _TokensToNextStage().eval()
    counted = count(model, (1, 3, 32, 32))
    assert "embed2" in [lay.name for lay in counted.layers]
    report = compress(export_onnx(model, (1, 3, 32, 32), opset=17).model).report
    assert report["totals"]["macs"] == counted.macs
