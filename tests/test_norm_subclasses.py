"""Norms and layers written as subclasses with a forward of their own, as timm and Hugging Face write ConvNeXt:
a LayerNorm over the channels of (N, C, H, W) that permutes around `F.layer_norm` (timm's LayerNorm2d) or around
its base's forward (transformers' ConvNextLayerNorm). The call of the function on the module's own parameters
reads as the module, the permutes stay ops of the graph: a block's residual branch is a depth group, its
channels are followed as before, and the cut and the thinning are exact, in fx graphs and torch.export's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from counted_cut import assert_cut_as_counted, assert_thinned_exactly, exported
from torch import nn
from untraceable import untraceable
from zeroing import zero_groups

from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.structure import analyze, trace

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 3, 16, 16)


class LayerNorm2d(nn.LayerNorm):
    """timm's form: the function called between two permutes."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class FormatLayerNorm(nn.LayerNorm):
    """transformers' form: the base's forward, after a permute where the channels come first."""

    def __init__(self, channels: int, channels_first: bool = False):
        super().__init__(channels, eps=1e-6)
        self.channels_first = channels_first

    def forward(self, x):
        if self.channels_first:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


class Block(nn.Module):
    """A ConvNeXt block: depthwise 5x5, LayerNorm over channels last, Linear-GELU-Linear, a layer scale."""

    def __init__(self, dim: int, norm: type[nn.Module]):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.norm = norm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 3 * dim), nn.Linear(3 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.fc2(F.gelu(self.fc1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    def __init__(self, style: str = "timm"):
        super().__init__()
        first = LayerNorm2d if style == "timm" else lambda c: FormatLayerNorm(c, channels_first=True)
        last = nn.LayerNorm if style == "timm" else FormatLayerNorm
        self.stem, self.stem_norm = nn.Conv2d(3, 8, 2, stride=2), first(8)
        self.blocks1 = nn.Sequential(Block(8, last), Block(8, last))
        self.down_norm, self.down = first(8), nn.Conv2d(8, 16, 2, stride=2)
        self.blocks2 = nn.Sequential(Block(16, last))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.blocks1(self.stem_norm(self.stem(x)))
        x = self.blocks2(self.down(self.down_norm(x)))
        return self.head(x.mean((2, 3)))


def _model(style: str, traced: str) -> nn.Module:
    torch.manual_seed(0)
    model = (ConvNeXtLike if traced == "fx" else untraceable(ConvNeXtLike))(style).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):  # away from 1 and 0, so a lost scale or shift shows
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("style", ["timm", "transformers"])
@pytest.mark.parametrize("traced", ["fx", "torch.export"])
def test_norm_subclasses_read_as_their_base(style, traced):
    model = _model(style, traced)
    called = {n.target for n in trace(model, SHAPE).graph.nodes if n.op == "call_module"}
    assert {"stem_norm", "down_norm", "blocks1.0.norm", "blocks2.0.norm"} <= called
    st = analyze(model, SHAPE)
    assert {"stem", "blocks1.0.fc1", "blocks1.0.fc2", "down", "head"} <= set(st.layers)
    # The stream is normalised over its channels, so its channels stay; the inner widths do not.
    reasons = {st.pin_reason(i) for i in st.layers["stem"].out_ids}
    assert len(reasons) == 1 and "normalises over these channels" in reasons.pop()
    assert not any(st.pin_reason(i) for i in st.layers["blocks1.0.fc1"].out_ids)


@pytest.mark.parametrize("style", ["timm", "transformers"])
@pytest.mark.parametrize("traced", ["fx", "torch.export"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_convnext_blocks_are_depth_groups_cut_as_counted(style, traced, exporter):
    model = _model(style, traced)
    groups = {g.name: g for g in build_groups(model, SHAPE, ("neuron", "depth")) if g.removable}
    depth = sorted(n for n, g in groups.items() if g.kind == "depth")
    assert depth == ["depth blocks1.0", "depth blocks1.1", "depth blocks2.0"]
    zero_groups(model, [groups["depth blocks1.1"], groups["neuron blocks1.0.fc1[3]"],
                        groups["neuron blocks2.0.fc1[7]"], groups["neuron blocks2.0.fc1[40]"]])
    _, counted = assert_cut_as_counted(model, SHAPE, exported(model, SHAPE, exporter))
    assert counted.layer("blocks1.1.fc1").macs_after == 0
    assert counted.layer("blocks2.0.fc1").filters == (46, 48)


@pytest.mark.parametrize("style", ["timm", "transformers"])
def test_convnext_with_norm_subclasses_thins_exactly(style):
    model = _model(style, "fx")
    groups = {g.name: g for g in build_groups(model, SHAPE, ("neuron", "depth")) if g.removable}
    zero_groups(model, [groups["neuron blocks1.0.fc1[2]"], groups["neuron blocks2.0.fc1[5]"],
                        groups["neuron blocks2.0.fc1[6]"]])
    assert_thinned_exactly(model, SHAPE)
    assert (model.blocks1[0].fc1.out_features, model.blocks2[0].fc2.in_features) == (23, 46)
    assert type(model.stem_norm) is (LayerNorm2d if style == "timm" else FormatLayerNorm)  # the model's own modules


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
def test_a_conv_subclass_that_scales_after_its_base_keeps_the_scale(traced):
    """A subclass whose forward calls its base and then scales, the number first: the conv reads as the conv, the
    scale as an op after it (a zero filter stays zero, so it is cut)."""

    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return 3.0 * super().forward(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = ScaledConv(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3)

        def forward(self, x):
            return self.b(F.relu(self.a(x))).mean((2, 3))

    model = (Net if traced == "fx" else untraceable(Net))().eval()
    groups = {g.name: g for g in build_groups(model, (1, 3, 8, 8), ("filter",))}
    assert groups["filter a[2]"].removable
    zero_groups(model, [groups["filter a[2]"]])
    assert_cut_as_counted(model, (1, 3, 8, 8), exported(model, (1, 3, 8, 8)))
    assert_thinned_exactly(model, (1, 3, 8, 8))


def test_a_function_call_with_one_size_for_every_axis_reads_as_its_module():
    """`F.conv2d(x, w, b, 2, 1)` in a subclass's forward: the module's (2, 2) stride and (1, 1) padding."""

    class OwnForward(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, self.weight, self.bias, 2, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = OwnForward(3, 6, 3, stride=2, padding=1), nn.Conv2d(6, 4, 3)

        def forward(self, x):
            return self.b(F.relu(self.a(x))).mean((2, 3))

    model = Net().eval()
    st = analyze(model, (1, 3, 9, 9))
    assert st.layers["a"].stride == (2, 2) and st.layers["a"].out_hw == (5, 5)
    groups = {g.name: g for g in build_groups(model, (1, 3, 9, 9), ("filter",))}
    zero_groups(model, [groups["filter a[4]"]])
    assert_cut_as_counted(model, (1, 3, 9, 9), exported(model, (1, 3, 9, 9)))
