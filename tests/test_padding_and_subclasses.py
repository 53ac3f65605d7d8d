"""Padding of the spatial axes (TF-style 'same' padding by F.pad, nn.ZeroPad2d, reflection), in-place dropout, and
subclasses of torch.nn layers that keep their forward (Hugging Face's EfficientNetDepthwiseConv2d): channels
followed through them, as the surgery follows its Pad, in fx graphs and torch.export's."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from counted_cut import assert_cut_as_counted, assert_thinned_exactly, exported
from torch import nn
from untraceable import untraceable
from zeroing import zero_groups

from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.structure import analyze

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 3, 9, 9)


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise conv with an __init__ of its own and nn.Conv2d's forward."""

    def __init__(self, channels: int, kernel: int, stride: int = 1):
        super().__init__(channels, channels, kernel, stride=stride, groups=channels)


class SamePadded(nn.Module):
    """Convs padded TF-style (asymmetric F.pad before a strided depthwise conv), by a ZeroPad2d module and by
    reflection, with an in-place dropout between."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.dw = DepthwiseConv2d(8, 3, stride=2)
        self.pad = nn.ZeroPad2d((1, 1, 1, 1))
        self.pw = nn.Conv2d(8, 12, 1)
        self.mix = nn.Conv2d(12, 12, 3)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.dw(F.pad(x, (0, 1, 0, 1)))  # what TF's 'same' gives a stride-2 3x3 conv on an odd side
        x = F.dropout(self.pw(self.pad(F.relu(x))), 0.0, training=False, inplace=True)
        x = self.mix(F.pad(F.relu(x), (1, 1, 1, 1), mode="reflect"))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
def test_zero_channels_go_through_spatial_padding(traced):
    model = (SamePadded if traced == "fx" else untraceable(SamePadded))().eval()
    st = analyze(model, SHAPE)
    assert set(st.layers) == {"stem", "dw", "pw", "mix", "fc"}
    assert st.layers["dw"].carries_channels
    assert {why for why in st.pinned.values()} == {"model input", "model output"}
    groups = {g.name: g for g in build_groups(model, SHAPE, ("filter",))}
    zero_groups(model, [groups["filter stem[2] +1 coupled"], groups["filter stem[5] +1 coupled"],
                        groups["filter pw[4]"], groups["filter pw[9]"]])
    _, counted = assert_cut_as_counted(model, SHAPE, exported(model, SHAPE))
    assert counted.layer("dw").filters == (6, 8) and counted.layer("mix").channels == (10, 12)


def test_padded_model_thins_exactly():
    model = SamePadded().eval()
    groups = {g.name: g for g in build_groups(model, SHAPE, ("filter",))}
    zero_groups(model, [groups["filter stem[2] +1 coupled"], groups["filter pw[9]"]])
    assert_thinned_exactly(model, SHAPE)
    assert (model.dw.in_channels, model.dw.groups, model.mix.in_channels) == (7, 7, 11)


class Padded(nn.Module):
    def __init__(self, pad, padded_channels: int = 0):
        super().__init__()
        self.a, self.b, self.pad = nn.Conv2d(3, 6, 1), nn.Conv2d(6 + padded_channels, 4, 3), pad

    def forward(self, x):
        return self.b(self.pad(self.a(x)))


@pytest.mark.parametrize("pad,why,padded_channels", [
    (nn.ConstantPad2d(1, 0.5), "ConstantPad2d pad (channel mixing or f(0) != 0)", 0),  # a zero channel is 0.5 there
    (lambda x: F.pad(x, (1, 1, 1, 1), value=1.0), "pad", 0),
    (lambda x: F.pad(x, (0, 0, 0, 0, 0, 2)), "pad", 2),  # two more channels
])
def test_padding_that_makes_a_zero_channel_nonzero_or_pads_channels_pins_them(pad, why, padded_channels):
    if not isinstance(pad, nn.Module):
        fn = pad

        class Fn(nn.Module):
            def forward(self, x):
                return fn(x)
        pad = Fn()
    st = analyze(Padded(pad, padded_channels).eval(), (1, 3, 6, 6))
    reasons = {st.pin_reason(i) for i in st.layers["a"].out_ids}
    assert len(reasons) == 1 and why in reasons.pop()


class DoubledConv2d(nn.Conv2d):
    """Overrides the helper nn.Conv2d's forward calls: not the conv its base computes."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2 * weight, bias)


def test_a_subclass_that_overrides_a_helper_of_its_forward_is_no_plain_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = DoubledConv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.b(F.relu(self.a(x)))

    st = analyze(Net().eval(), (1, 3, 4, 4))
    assert "a" not in st.layers
    assert all(st.pin_reason(i) for i in st.layers["b"].in_ids)


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """A LayerNorm over the channels of (N, C, H, W), as ConvNeXt's stems write one: its own forward."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def test_a_norm_subclass_with_its_own_forward_is_not_read_as_its_base_in_torch_exports_graph():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.fc = nn.Conv2d(3, 8, 3), ChannelsFirstLayerNorm(8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x)).mean((2, 3)))

    st = analyze(untraceable(Net)().eval(), (1, 3, 6, 6))  # would fail to run were norm called on its input
    reasons = {st.pin_reason(i) for i in st.layers["conv"].out_ids}
    assert len(reasons) == 1 and "normalises over these channels" in reasons.pop()
