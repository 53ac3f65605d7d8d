"""A residual branch is a depth group when it writes exactly zero once its layers' parameters are zero. Walking
back from the branch's end, each op must keep zero zero only until a layer that writes zero whatever it reads: what
runs before that layer (ConvNeXt V2's global response normalisation, GRN, before its second Linear) need only stay
finite. A division by a value not kept away from zero could turn infinite there, and the zero layer after it would
then write NaN: such a branch is no depth group, and neither is one whose end adds a parameter after its last layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from counted_cut import assert_cut_as_counted, exported
from torch import nn
from untraceable import untraceable
from zeroing import zero_groups

from sslcompress.finetune.groups import build_groups

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 3, 16, 16)


class GRN(nn.Module):
    """Global response normalisation, channels last, as ConvNeXt V2 writes it: each channel's L2 norm over the
    positions, divided by the mean of the norms over the channels (which couples them), a scale and a shift."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(1, 1, 1, dim))
        self.bias = nn.Parameter(0.1 * torch.randn(1, 1, 1, dim))

    def forward(self, x):
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.weight * (x * n) + self.bias + x


class Block(nn.Module):
    """ConvNeXt V2's block: depthwise conv, channels last, LayerNorm, Linear, GELU, GRN, Linear, back."""

    def __init__(self, dim: int, middle: str = "grn"):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.grn = GRN(4 * dim)
        self.middle = middle

    def forward(self, x):
        h = self.fc1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))
        h = F.gelu(h)
        if self.middle == "grn":
            h = self.grn(h)
        elif self.middle == "normalize":
            h = F.normalize(h, dim=-1)  # x / max(|x|, eps), as Swin V2's cosine attention normalises q and k
        elif self.middle == "unguarded":
            h = h / h.abs().sum(dim=-1, keepdim=True)  # 0 / 0 once fc1 is zero
        h = self.fc2(h)
        if self.middle == "shift after":
            h = h + self.grn.bias[..., : h.shape[-1]]  # the branch writes this shift once its layers are zero
        return x + h.permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self, middle: str = "grn", dim: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(Block(dim, middle), Block(dim, middle))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _model(middle: str, traced: str) -> nn.Module:
    torch.manual_seed(0)
    return (Net if traced == "fx" else untraceable(Net))(middle).eval()


def _depth_groups(model) -> dict:
    return {g.name: g for g in build_groups(model, SHAPE, ("depth",)) if g.removable and g.kind == "depth"}


@pytest.mark.parametrize("middle", ["grn", "normalize"])
@pytest.mark.parametrize("traced", ["fx", "torch.export"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_branch_with_a_grn_before_its_last_layer_is_a_depth_group_cut_as_counted(traced, exporter, middle):
    model = _model(middle, traced)
    groups = _depth_groups(model)
    # The group names the branch's layers: the block also holds the GRN's scale and shift, which go with it.
    assert sorted(groups) == ["depth blocks.0[dwconv,norm,fc1,fc2]", "depth blocks.1[dwconv,norm,fc1,fc2]"]
    zero_groups(model, [groups["depth blocks.0[dwconv,norm,fc1,fc2]"]])
    out = model(torch.randn(SHAPE))
    assert torch.isfinite(out).all()
    result, counted = assert_cut_as_counted(model, SHAPE, exported(model, SHAPE, exporter))
    # The surgery also finds the GRN's own `+ x` adding a zero operand: two Adds go, one branch.
    assert counted.blocks_removed == ("blocks.0[dwconv,norm,fc1,fc2]",) and result.report["blocks_removed"]
    assert result.report["totals"]["macs_after"] < result.report["totals"]["macs"]


@pytest.mark.parametrize("middle", ["unguarded", "shift after"])
def test_a_branch_that_could_write_nan_or_a_shift_is_no_depth_group(middle):
    model = _model(middle, "fx")
    assert _depth_groups(model) == {}
    if middle == "unguarded":
        # What the rule guards against: its layers zeroed, the branch writes NaN, not zero.
        for p in model.blocks[0].parameters():
            p.data.zero_()
        assert torch.isnan(model.blocks[0](torch.randn(1, 8, 4, 4))).all()


def test_ops_before_a_zero_layer_need_not_keep_zero_zero():
    """An eval-mode BatchNorm without scale and shift maps zero to -mean/std, but before a conv whose weights
    are zero that does not matter."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8, affine=False)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.conv2(torch.sigmoid(self.bn(self.conv1(x))))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Branchy().eval()
    model.bn.running_mean.uniform_(0.5, 1.0)
    groups = _depth_groups(model)
    assert list(groups) == ["depth add"]  # the branch of the root module is named by its sum
    zero_groups(model, list(groups.values()))
    result, counted = assert_cut_as_counted(model, SHAPE, exported(model, SHAPE))
    assert len(result.report["blocks_removed"]) == 1
