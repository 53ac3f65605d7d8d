"""Layers the analysis cannot read as modules still count as the export computes them: a conv whose weight the
forward standardises (BiT's and NFNet's weight-standardised convs; its channels pinned, but its MACs in the
count), and tensors torch.export lifts out of a forward that builds them each call (BEiT's relative position
index) are taken from the exported program, so such models are analysed at all."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from counted_cut import assert_cut_as_counted, exported
from torch import nn
from untraceable import untraceable
from zeroing import zero_groups

from sslcompress.finetune.counting import count
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.structure import analyze
from sslcompress.surgery.compress import compress

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 3, 12, 12)


class StandardisedConv2d(nn.Conv2d):
    """BiT's WeightStandardizedConv2d: each filter standardised to zero mean and unit variance each call."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StandardisedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.ws = StandardisedConv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = self.ws(F.relu(self.stem(x)))
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))


class BuildsATensor(nn.Module):
    """Builds a per-channel constant in its forward: torch.export lifts it into the program."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = y * torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 3.0]).view(1, 6, 1, 1)
        return self.b(y).mean((2, 3))


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
def test_a_weight_standardised_conv_is_counted_as_its_export(traced):
    torch.manual_seed(0)
    model = (StandardisedNet if traced == "fx" else untraceable(StandardisedNet))().eval()
    st = analyze(model, SHAPE)
    assert "ws" not in st.layers  # its weight is computed: a wall, its channels pinned
    assert all(st.pin_reason(i) for i in st.layers["stem"].out_ids)
    assert count(model, SHAPE).macs == compress(exported(model, SHAPE)).report["totals"]["macs"]
    groups = {g.name: g for g in build_groups(model, SHAPE, ("neuron",)) if g.removable}
    zero_groups(model, [groups["neuron fc1[3]"], groups["neuron fc1[9]"]])
    assert_cut_as_counted(model, SHAPE, exported(model, SHAPE))


def test_a_tensor_built_in_the_forward_comes_from_the_exported_program():
    model = untraceable(BuildsATensor)().eval()
    st = analyze(model, SHAPE)  # read from torch.export's program, where the tensor is lifted
    assert set(st.layers) == {"a", "b"}
    assert count(model, SHAPE).macs == compress(exported(model, SHAPE)).report["totals"]["macs"]


class ConvAfterAWall(nn.Module):
    """Tokens (B, N, C) from a Linear, reshaped to (B, H, W, C) and permuted back to channels first (SwiftFormer's
    attention output), then convs: the analysis does not follow that reshape, so the convs' channels stay, but
    they compute, and count, all of them."""

    def __init__(self):
        super().__init__()
        self.patch, self.mix = nn.Conv2d(3, 8, 3, stride=3), nn.Conv2d(8, 8, 1)
        self.proj = nn.Linear(8, 8)
        self.conv, self.dw = nn.Conv2d(8, 12, 1), nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        t = self.mix(self.patch(x))
        b, c, h, w = t.shape
        t = self.proj(t.flatten(2).transpose(1, 2))
        y = self.mix(t.reshape(b, h, w, c).permute(0, 3, 1, 2))  # called again, on channels not followed
        return self.head(self.dw(F.relu(self.conv(y))).mean((2, 3)))


class SoftmaxOverOne(nn.Module):
    """A softmax over an axis of size 1 is ones whatever it reads (transformers' SwiftFormer writes one):
    every export folds it, and the Linear only it reads, so that Linear holds no MACs and no groups."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 3, stride=3)
        self.q, self.w_g = nn.Linear(8, 8), nn.Linear(8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        weights = self.w_g(self.q(t)).softmax(dim=-1)  # (B, 16, 1): ones
        return self.head((t * weights).mean(1))


@pytest.mark.parametrize("net", [ConvAfterAWall, SoftmaxOverOne])
def test_the_count_is_the_exports(net):
    torch.manual_seed(0)
    model = net().eval()
    st = analyze(model, SHAPE)
    if net is ConvAfterAWall:
        assert {"conv", "dw"} <= set(st.layers) and len(st.layers["mix"].more_hw) == 1
        assert all(st.pin_reason(i) for i in st.layers["mix"].in_ids + st.layers["mix"].out_ids)
    else:
        assert "q" not in st.layers and "w_g" not in st.layers
    assert count(model, SHAPE).macs == compress(exported(model, SHAPE)).report["totals"]["macs"]


class Decoder(nn.Module):
    """An encoder-decoder with transposed convs (1-D and 2-D): walls, counted as the export computes them."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.up1d = nn.ConvTranspose1d(4, 2, 3, stride=2)

    def forward(self, x):
        y = self.up(F.relu(self.down(x)))  # (N, 4, 12, 12)
        return self.up1d(y.mean(2))  # (N, 2, 25)


def test_transposed_convs_are_counted_as_exported():
    model = Decoder().eval()
    counted = count(model, SHAPE)
    assert counted.macs == compress(exported(model, SHAPE)).report["totals"]["macs"]
    # down 8x3x3x3 at 6x6, up every weight (8x4x4x4) per input pixel (6x6), up1d 4x2x3 per input step (12)
    assert counted.macs == 8 * 27 * 36 + 512 * 36 + 24 * 12
