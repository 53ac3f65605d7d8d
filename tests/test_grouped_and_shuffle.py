"""Grouped convolutions, depthwise ones with a channel multiplier, torch.chunk / torch.split along channels and
channel shuffles on the torch side: which filter groups are removable, the thinned model computes what the
masked one computes, and the MACs the counter predicts are those of the ONNX model the surgery cuts (which
ONNX Runtime checks against the uncut one)."""

from __future__ import annotations

import copy
import random

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslcompress import compress, export_onnx
from sslcompress.finetune.counting import count
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.structure import analyze
from sslcompress.finetune.thin import thin

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 3, 16, 16)


class ResNeXtBlock(nn.Module):
    """A bottleneck whose 3x3 conv has 4 groups of 8 channels, with BatchNorm and a residual sum."""

    def __init__(self, width: int = 32, groups: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        x = F.relu(x + self.bn3(self.conv3(y)))
        return self.fc(x.mean((2, 3)))


class GroupedBias(nn.Module):
    """Grouped convs with biases, one (2 groups, 6 -> 4) feeding another (2 groups, 4 -> 8)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.g1 = nn.Conv2d(6, 4, 3, padding=1, groups=2)
        self.g2 = nn.Conv2d(4, 8, 1, groups=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.g1(F.relu(self.stem(x))))
        return self.fc(F.relu(self.g2(x)).mean((2, 3)))


def channel_shuffle(x, groups: int):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's basic unit: chunk, one half through 1x1 - depthwise 3x3 - 1x1, cat, channel shuffle."""

    def __init__(self, c: int = 16):
        super().__init__()
        half = c // 2
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.pw1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.dw = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.pw2 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.head = nn.Conv2d(c, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        a, b = x.chunk(2, dim=1)
        b = F.relu(self.bn1(self.pw1(b)))
        b = F.relu(self.bn3(self.pw2(self.bn2(self.dw(b)))))
        x = channel_shuffle(torch.cat((a, b), dim=1), 2)
        return self.fc(F.relu(self.head(x)).mean((2, 3)))


class SplitCat(nn.Module):
    """torch.split into unequal parts and a chunk of one of them, each part read, then concatenated."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.left = nn.Conv2d(6, 8, 3, padding=1)
        self.right = nn.Conv2d(10, 8, 1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(16, 12, 3, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = torch.split(x, [6, 10], dim=1)
        c, d = torch.chunk(F.relu(self.mid(F.relu(self.right(b)))), 2, dim=1)
        x = torch.cat([F.relu(self.left(a)), d, c], dim=1)
        return self.fc(F.relu(self.head(x)).mean((2, 3)))


class Multiplier(nn.Module):
    """A depthwise conv with two outputs per input channel (groups == in_channels < out_channels)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.dw(x)))
        return self.fc(F.relu(self.pw(x)).mean((2, 3)))


def _model(cls) -> nn.Module:
    torch.manual_seed(0)
    model = cls().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # BatchNorm statistics that matter, so a wrong cut shows in the outputs
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def _filters(model) -> dict[str, object]:
    return {g.name: g for g in build_groups(model, SHAPE, ("filter",))}


@torch.no_grad()
def _zero(model, names) -> None:
    groups = _filters(model)
    params = dict(model.named_parameters())
    for name in names:
        for s in groups[name].slices:
            params[s.param][list(s.index)] = 0


def _of(model, layer: str) -> list[str]:
    return [n for n, g in _filters(model).items() if g.removable and n.startswith(f"filter {layer}[")]


def _ort(proto, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _close(a, b) -> bool:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def _check_cut(model):
    """The counter's prediction against the cut ONNX model, and all three models against each other."""
    counted = count(model, SHAPE)
    result = compress(export_onnx(model, SHAPE).model)
    assert result.verification.passed, result.report["verification"]
    totals = result.report["totals"]
    assert counted.macs == totals["macs"]
    assert counted.macs_after == totals["macs_after"] < counted.macs
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        masked = model(x)
    assert _close(masked, _ort(result.model, x))
    thinned = copy.deepcopy(model)
    res = thin(thinned, SHAPE)
    assert res.applied, res.reason
    with torch.no_grad():
        assert _close(masked, thinned(x))
    return counted, result, thinned


def _onnx_layer(result, name: str) -> dict:
    return next(lay for lay in result.report["layers"] if lay["name"] == f"/{name}/Conv")


# --- grouped convolutions -------------------------------------------------------------------------------------


def test_grouped_conv_filters_are_removable():
    model = _model(ResNeXtBlock)
    groups = _filters(model)
    removable = [g for g in groups.values() if g.removable]
    # Before, only the 16 residual channels: conv1's and conv2's 64 were pinned by the grouped conv.
    assert (len(removable), len(groups)) == (80, 90)
    assert len(_of(model, "conv1")) == len(_of(model, "conv2")) == 32
    g = groups["filter conv2[5] +1 coupled"]
    assert {s.param for s in g.slices} == {"conv2.weight", "bn2.weight", "bn2.bias"}
    # A channel a grouped conv reads has no channel group of its own (no W[:, c] slice holds its fibre).
    assert not [c for c in build_groups(model, SHAPE, ("channel",)) if "conv2" in c.name]


def test_unevenly_dead_filters_are_kept_until_the_groups_are_equal():
    model = _model(ResNeXtBlock)
    # conv2's groups lose 3, 1, 2 and 0 of their 8 filters: the cut keeps 8 per group, since the last group
    # loses none; then with group 3 down by 1 too, every group keeps 7.
    _zero(model, [f"filter conv2[{i}] +1 coupled" for i in (0, 1, 2, 8, 16, 17)])
    counted = count(model, SHAPE)
    assert counted.layer("conv2").filters == (32, 32)
    _zero(model, ["filter conv2[31] +1 coupled"])
    counted, result, thinned = _check_cut(model)
    assert counted.layer("conv2").filters == (28, 32) and counted.layer("conv3").channels == (28, 32)
    assert _onnx_layer(result, "conv2")["weight_after"] == [28, 8, 3, 3]
    assert thinned.conv2.groups == 4 and tuple(thinned.conv2.weight.shape) == (28, 8, 3, 3)


def test_a_dead_group_goes_whole():
    model = _model(ResNeXtBlock)
    # Group 1 of conv2 (filters 8..15) and what it reads (conv1's 8..15): the conv keeps 3 groups.
    _zero(model, _of(model, "conv2")[8:16] + _of(model, "conv1")[8:16])
    counted, result, thinned = _check_cut(model)
    assert counted.layer("conv2").filters == (24, 32) and counted.layer("conv2").channels == (24, 32)
    assert counted.layer("conv1").filters == (24, 32)
    assert _onnx_layer(result, "conv2")["group_after"] == 3
    assert thinned.conv2.groups == 3 and tuple(thinned.conv2.weight.shape) == (24, 8, 3, 3)
    assert thinned.conv1.out_channels == 24


def test_dead_inputs_of_a_grouped_conv_go_per_group():
    model = _model(ResNeXtBlock)
    # conv1's filters feeding local channel 2 and 5 of every group, and 7 of group 0 only: every group keeps 6.
    _zero(model, [n for i, n in enumerate(_of(model, "conv1")) if i % 8 in (2, 5) or i == 7])
    counted, result, thinned = _check_cut(model)
    assert counted.layer("conv2").channels == (24, 32) and counted.layer("conv1").filters == (24, 32)
    assert _onnx_layer(result, "conv2")["weight_after"] == [32, 6, 3, 3]
    # The thinned model slices one set of input positions for every group: 0, 1, 3, 4, 6, 7 (channel 7 of
    # group 0 stays, zero, under its mask).
    assert thinned.conv2.groups == 4 and tuple(thinned.conv2.weight.shape) == (32, 6, 3, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_zero_filters_of_grouped_convs_cut_exactly(seed):
    model = _model(GroupedBias if seed == 2 else ResNeXtBlock)
    removable = [n for n, g in _filters(model).items() if g.removable]
    _zero(model, random.Random(seed).sample(removable, len(removable) // 3))
    _check_cut(model)


class SharedInput(nn.Module):
    """The stem's channels read by a grouped conv and by a 1x1 conv beside it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.side = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.fc(F.relu(self.grouped(x) + self.side(x)).mean((2, 3)))


def test_a_channel_a_grouped_conv_also_reads_stays_while_it_does():
    model = _model(SharedInput)
    channels = [g for g in build_groups(model, SHAPE, ("channel",)) if g.name.startswith("channel side[")]
    assert len(channels) == 8 and {g.reason for g in channels} == {"also read by grouped convolution grouped"}
    with torch.no_grad():
        model.side.weight[:, :3] = 0  # the 1x1 conv no longer reads stem channels 0-2; the grouped conv does,
        model.grouped.weight[:4, 1] = 0  # but for channel 1, which goes; as does channel 5, a zero filter
        model.stem.weight[5] = 0
        model.stem.bias[5] = 0
    counted, result, thinned = _check_cut(model)
    assert counted.layer("stem").filters == (6, 8) and counted.layer("grouped").channels == (6, 8)
    assert counted.layer("side").channels == (6, 8)
    assert _onnx_layer(result, "grouped")["weight_after"] == [8, 3, 3, 3]
    assert thinned.grouped.groups == 2 and thinned.grouped.in_channels == 6


def test_depthwise_with_a_channel_multiplier():
    model = _model(Multiplier)
    groups = _filters(model)
    stem = [g for n, g in groups.items() if n.startswith("filter stem[")]
    # Before, grouped and pinned; now input channel c and its two depthwise outputs are one group.
    assert len(stem) == 8 and all(g.removable for g in stem)
    assert {s.index for s in stem[3].slices if s.param == "dw.weight"} == {(6, 7)}
    _zero(model, [g.name for g in stem[1:4]])
    counted, _, thinned = _check_cut(model)
    assert counted.layer("dw").filters == (10, 16) and counted.layer("pw").channels == (10, 16)
    assert (thinned.dw.in_channels, thinned.dw.out_channels, thinned.dw.groups) == (5, 10, 5)


# --- chunk, split and channel shuffle -------------------------------------------------------------------------


def test_shuffle_unit_pins_what_the_shuffle_reads():
    model = _model(ShuffleUnit)
    groups = _filters(model)
    removable = {n for n, g in groups.items() if g.removable}
    # Before: 20 of 54 (the chunk pinned the stem). Now the stem's second half, which the branch reads, can go;
    # its first half and pw2's outputs reach the shuffle, which the surgery cannot cut either.
    assert len(removable) == 28 and len(groups) == 54
    assert {f"filter stem[{i}] +1 coupled" for i in range(8, 16)} <= removable
    why = groups["filter stem[0] +1 coupled"].reason
    assert why == "reshape view that splits the channel axis into groups (a channel shuffle)"
    assert not groups["filter pw2[0] +1 coupled"].removable


def test_shuffle_unit_cuts_exactly():
    model = _model(ShuffleUnit)
    _zero(model, ["filter stem[9] +1 coupled", "filter pw1[2] +3 coupled", "filter pw1[6] +3 coupled",
                  "filter head[0]", "filter head[5]"])
    counted, _, thinned = _check_cut(model)
    assert counted.layer("stem").filters == (15, 16) and counted.layer("dw").filters == (6, 8)
    # The chunk splits the thinned stem's channels in two halves: with the first half pinned, the second keeps 8.
    assert thinned.stem.out_channels == 16 and thinned.dw.groups == 6 and thinned.head.out_channels == 10


def test_split_and_chunk_parts_are_followed():
    model = _model(SplitCat)
    groups = _filters(model)
    assert all(g.removable for n, g in groups.items() if not n.startswith("filter fc["))
    st = analyze(model, SHAPE)
    # head reads left's channels, then mid's second half, then its first: the ids follow the parts.
    assert st.layers["head"].in_ids == st.layers["left"].out_ids + st.layers["mid"].out_ids[4:] \
        + st.layers["mid"].out_ids[:4]
    assert st.layers["left"].in_ids == st.layers["stem"].out_ids[:6]
    _zero(model, ["filter stem[2]", "filter stem[9]", "filter mid[1]", "filter mid[5]", "filter mid[6]",
                  "filter left[0]", "filter right[3]"])
    counted, result, thinned = _check_cut(model)
    assert counted.layer("head").channels == (12, 16) and counted.layer("left").channels == (5, 6)
    # torch.split's sizes are written in the forward: the thinned model keeps the stem's channels. The chunk of
    # mid's outputs loses as many from each half (one from the first, two from the second: one each).
    assert thinned.stem.out_channels == 16 and thinned.mid.out_channels == 6 and thinned.left.out_channels == 7
    assert result.verification.passed


class OddSplits(nn.Module):
    """A split along the width (a wall), and a chunk whose first part the forward drops."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        left, right = x.split(8, dim=3)
        x = F.relu(self.conv(torch.cat([left, right], dim=3)))
        x = torch.cat(x.chunk(4, dim=1)[1:], dim=1)
        return self.fc(F.relu(self.head(x)).mean((2, 3)))


def test_splits_it_cannot_follow_pin_and_dropped_parts_go():
    model = _model(OddSplits)
    groups = _filters(model)
    assert {g.reason for n, g in groups.items() if n.startswith("filter stem[")} == \
        {"split split along dim 3, not the channel axis"}
    assert all(g.removable for n, g in groups.items() if n.startswith(("filter conv[", "filter head[")))
    _zero(model, ["filter conv[5]", "filter head[0]"])
    counted, _, thinned = _check_cut(model)
    # conv's first two channels are read by no one: the surgery deletes them, and the count says so.
    assert counted.layer("conv").filters == (5, 8) and counted.layer("head").channels == (5, 6)
    # Thinned, the chunk must still cut 4 equal parts: conv keeps its width, head loses its dead filter.
    assert thinned.conv.out_channels == 8 and thinned.head.out_channels == 7


# --- code fx cannot trace ---------------------------------------------------------------------------------------


class ShapeBranch(nn.Module):
    """Python control flow on a shape (fx cannot trace it; torch.export records the branch this input takes),
    with BatchNorm, a squeeze-and-excitation gate, a chunk and a residual sum."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.excite = nn.Conv2d(8, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        if x.shape[-1] > 8:
            x = F.max_pool2d(x, 2)
        x = x * torch.sigmoid(self.excite(x.mean((2, 3), keepdim=True)))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([b, a], dim=1)
        x = F.relu(x + self.conv(x))
        return self.fc(F.adaptive_avg_pool2d(x, 4).view(x.size(0), -1))


def test_shape_dependent_control_flow_is_read_through_torch_export():
    model = _model(ShapeBranch)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    st = analyze(model, SHAPE)
    assert set(st.layers) == {"stem", "excite", "conv", "fc"} and set(st.norms) == {"bn"}
    assert st.layers["stem"].out_hw == (16, 16) and st.layers["conv"].out_hw == (8, 8)  # the branch taken
    assert [b.modules for b in st.branches] == [["conv"]]
    groups = build_groups(model, SHAPE, ("filter", "depth"))
    stem = [g for g in groups if g.name.startswith("filter stem[")]
    # A channel of the stem, its gate's excitation row and the residual conv's filter are one group.
    assert len(stem) == 8 and all(g.removable for g in stem)
    assert {"stem.weight", "bn.weight", "excite.weight", "conv.weight"} <= {s.param for s in stem[0].slices}
    _zero(model, [stem[i].name for i in (0, 1, 4, 5, 6)])
    counted, _, thinned = _check_cut(model)
    assert counted.layer("conv").filters == (3, 8) and counted.layer("fc").channels == (48, 128)
    # The chunk splits the thinned stem in halves: the second half lost three, the first two, so both lose two.
    assert thinned.stem.out_channels == thinned.conv.out_channels == 4 and thinned.fc.in_features == 64


def test_value_dependent_control_flow_is_refused_in_one_sentence():
    class ValueBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.c(x) if x.sum() > 0 else self.c(-x)

    with pytest.raises(Exception) as info:
        analyze(ValueBranch(), SHAPE)
    text = str(info.value)
    assert "\n" not in text and text.startswith("cannot trace ValueBranch: torch.fx stops at Python control flow")
    assert "torch.export at control flow on the values of a tensor" in text
