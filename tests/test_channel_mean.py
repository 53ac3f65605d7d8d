"""A mean over the channels of a per-channel statistic (ConvNeXt V2's global response normalisation, GRN) couples
every channel, but a channel that is exactly zero adds zero to the sum: it can go as long as the mean keeps
dividing by the original count. Its group owns the Linear's row and bias that write it, the GRN's scale and
shift at that channel and the next Linear's column; the surgery cuts it and multiplies the mean by kept / total;
thinning slices it and hooks the GRN so that its mean divides by the count it had.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from counted_cut import assert_cut_as_counted, assert_thinned_exactly, exported
from onnx import numpy_helper
from test_branches_behind_a_layer import GRN as HFGRN
from torch import nn
from untraceable import untraceable
from zeroing import zero_groups

from sslcompress.finetune.counting import count
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.kept_count import KeptMean
from sslcompress.finetune.progressive import compose
from sslcompress.finetune.thin import ThinPlan, apply_plan, thin
from sslcompress.surgery.compress import compress

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 3, 16, 16)
DIM = 8


class OfficialGRN(nn.Module):
    """GRN as the ConvNeXt V2 authors write it, channels last: `torch.norm` and gamma, beta."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(0.1 * torch.randn(1, 1, 1, dim))
        self.beta = nn.Parameter(0.1 * torch.randn(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ChannelsFirstGRN(nn.Module):
    """GRN on (N, C, H, W), between 1x1 convs: the channel axis is dim 1."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(1, dim, 1, 1))
        self.bias = nn.Parameter(0.1 * torch.randn(1, dim, 1, 1))

    def forward(self, x):
        g = torch.linalg.vector_norm(x, ord=2, dim=(2, 3), keepdim=True)
        n = g / (g.mean(dim=1, keepdim=True) + 1e-6)
        return self.weight * (x * n) + self.bias + x


# Hugging Face's ConvNextV2GRN form (`torch.linalg.vector_norm`, weight and bias): the depth tests' GRN.
FORMS = {"official": OfficialGRN, "hf": HFGRN, "channels first": ChannelsFirstGRN}
SHIFT = {"official": "beta", "hf": "bias", "channels first": "bias"}


class Block(nn.Module):
    """ConvNeXt V2's block: depthwise conv, LayerNorm, Linear, GELU, GRN, Linear (1x1 convs channels first)."""

    def __init__(self, dim: int, form: str):
        super().__init__()
        self.form = form
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        if form == "channels first":
            self.pwconv1, self.pwconv2 = nn.Conv2d(dim, 4 * dim, 1), nn.Conv2d(4 * dim, dim, 1)
        else:
            self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.grn = FORMS[form](4 * dim)

    def forward(self, x):
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        if self.form == "channels first":
            h = self.pwconv2(self.grn(F.gelu(self.pwconv1(h.permute(0, 3, 1, 2)))))
            return x + h
        h = self.pwconv2(self.grn(F.gelu(self.pwconv1(h))))
        return x + h.permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self, form: str = "hf", dim: int = DIM):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(Block(dim, form), Block(dim, form))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _model(form: str, traced: str = "fx") -> nn.Module:
    torch.manual_seed(0)
    return (Net if traced == "fx" else untraceable(Net))(form).eval()


def _neurons(model) -> list:
    return [g for g in build_groups(model, SHAPE, ("neuron",)) if g.removable]


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
@pytest.mark.parametrize("form", list(FORMS))
def test_the_hidden_channels_of_a_grn_are_groups_with_its_scale_and_shift(form, traced):
    model = _model(form, traced)
    groups = build_groups(model, SHAPE, ("filter", "channel", "neuron"))
    neurons = [g for g in groups if g.kind == "neuron" and g.removable]
    assert len(neurons) == 2 * 4 * DIM
    shift = SHIFT[form]
    scale = "gamma" if form == "official" else "weight"
    first = {(s.param, s.index) for s in neurons[0].slices}
    assert first == {("blocks.0.pwconv1.weight", (0,)), ("blocks.0.pwconv1.bias", (0,)),
                     (f"blocks.0.grn.{scale}", (0,)), (f"blocks.0.grn.{shift}", (0,)),
                     ("blocks.0.pwconv2.weight", (0,))}
    # Zero columns of pwconv2 alone would leave a live channel that the mean still reads: no channel group.
    reads = [g for g in groups if g.kind == "channel" and g.name.startswith("channel blocks.0.pwconv2")]
    assert reads and all(not g.removable and "mean over the channels in blocks.0.grn" in g.reason for g in reads)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("form", list(FORMS))
def test_zero_grn_channels_are_cut_as_counted_and_the_mean_keeps_its_count(form, exporter):
    model = _model(form)
    neurons = _neurons(model)
    zero_groups(model, [neurons[i] for i in (0, 3, 7, 40, 41)])
    result, counted = assert_cut_as_counted(model, SHAPE, exported(model, SHAPE, exporter))
    assert result.report["totals"]["channels_removed"] == 5
    # Each mean over the channels that lost some is scaled back to the count it had: kept / total.
    fractions = sorted(numpy_helper.to_array(t).item() for t in result.model.graph.initializer
                       if t.name.endswith(".kept_fraction"))
    assert fractions == [29 / 32, 30 / 32]


@pytest.mark.parametrize("form", ["official", "hf"])
def test_a_zero_grn_channel_is_cut_as_counted_from_a_graph_torch_export_records(form):
    model = _model(form, "torch.export")
    neurons = _neurons(model)
    zero_groups(model, [neurons[i] for i in (1, 2, 33)])
    assert_cut_as_counted(model, SHAPE, exported(model, SHAPE))


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
@pytest.mark.parametrize("form", list(FORMS))
def test_thinning_slices_grn_channels_and_keeps_the_mean_dividing_by_the_count_it_had(form, traced):
    model = _model(form, traced)
    zero_groups(model, [_neurons(model)[i] for i in (0, 3, 7, 40)])
    x = torch.randn(2, *SHAPE[1:])
    want = _outputs(model, x)
    assert_thinned_exactly(model, SHAPE)
    shift = getattr(model.blocks[0].grn, SHIFT[form])
    assert shift.shape[1 if form == "channels first" else 3] == 4 * DIM - 3
    assert torch.allclose(_outputs(model, x), want, rtol=1e-5, atol=1e-6)
    # Sliced without its hooks, the GRN would divide by the channels left: outputs that differ.
    for block in model.blocks:
        block.grn._forward_pre_hooks.clear()
        block.grn._forward_hooks.clear()
    assert not torch.allclose(_outputs(model, x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
def test_a_thinned_grn_thinned_again_keeps_the_first_count(traced):
    """A later thinning of a thinned model reads the count kept already (a composed plan holds it once), and a
    model rebuilt from the plan, through its dict, computes what the thinned one does."""
    model = _model("hf", traced)
    dense = _model("hf", traced)
    zero_groups(model, _neurons(model)[:3])
    first = thin(model, SHAPE)
    assert first.applied, first.reason
    zero_groups(model, _neurons(model)[:2])  # two more hidden units of blocks.0 die
    x = torch.randn(2, *SHAPE[1:])
    want = _outputs(model, x)
    second = thin(model, SHAPE)
    assert second.applied, second.reason
    assert model.blocks[0].pwconv1.out_features == 4 * DIM - 5
    plan = ThinPlan.from_dict(compose(first.plan, second.plan).to_dict())
    assert plan.means == {"blocks.0.grn": (KeptMean((-1,), 4, 4 * DIM),)}
    apply_plan(dense, plan)
    dense.load_state_dict(model.state_dict())
    assert torch.allclose(_outputs(model, x), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(_outputs(dense, x), want, rtol=1e-5, atol=1e-6)


class TwoMeans(nn.Module):
    """Two hidden widths, each divided by its mean over the channels in one forward, with the same dims: one pair
    of hooks could not keep both counts."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, DIM, 4, stride=4)
        self.fc1, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(DIM, 2 * DIM)
        self.out1, self.out2 = nn.Linear(4 * DIM, DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        h1, h2 = F.gelu(self.fc1(x)), F.gelu(self.fc2(x))
        g1 = torch.linalg.vector_norm(h1, dim=(1, 2), keepdim=True)
        g2 = torch.linalg.vector_norm(h2, dim=(1, 2), keepdim=True)
        h1 = h1 * (g1 / (g1.mean(dim=-1, keepdim=True) + 1e-6))
        h2 = h2 * (g2 / (g2.mean(dim=-1, keepdim=True) + 1e-6))
        return (self.out1(h1) + self.out2(h2)).mean((1, 2))


def test_thinning_keeps_the_channels_of_means_it_cannot_tell_apart_and_says_why():
    torch.manual_seed(0)
    model = TwoMeans().eval()
    neurons = _neurons(model)
    assert len(neurons) == 6 * DIM
    zero_groups(model, [neurons[i] for i in (0, 1, 4 * DIM)])
    x = torch.randn(2, *SHAPE[1:])
    want = _outputs(model, x)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    result = thin(model, SHAPE)
    assert not result.applied
    assert "zero channels kept in the model's forward: its forward averages over the channels twice" in result.reason
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
    assert torch.equal(_outputs(model, x), want)
    assert_cut_as_counted(model, SHAPE, exported(model, SHAPE))


def test_a_grn_channel_whose_shift_is_not_zero_stays_in_the_count():
    """Its filter and scale zero, the channel writes its shift: not zero, so its group is not, and the count keeps
    it. The surgery finds the constant the shift leaves and folds it into the next Linear's bias (exact)."""
    model = _model("hf")
    neurons = _neurons(model)
    zero_groups(model, neurons[:3])
    both_zero = count(model, SHAPE)
    with torch.no_grad():
        model.blocks[0].grn.bias[..., 1] = 0.5
    shifted = count(model, SHAPE)
    per_channel = 2 * DIM * (SHAPE[2] // 4) * (SHAPE[3] // 4)  # its row of pwconv1 and column of pwconv2
    assert shifted.macs_after == both_zero.macs_after + per_channel
    assert shifted.dead_channels == both_zero.dead_channels - 1
    result = compress(exported(model, SHAPE))
    assert result.verification.passed
    assert result.report["totals"]["macs_after"] <= shifted.macs_after


class MeanMap(nn.Module):
    """A map of each position's mean over the channels, read by a Linear (as a spatial attention reads it): the
    Linear is a layer all the same, and a zero filter of the conv goes with the mean keeping its count."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, DIM, 4, stride=4)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean(dim=1).flatten(1))


def test_a_layer_that_reads_a_mean_over_the_channels_is_counted_and_a_zero_channel_goes():
    torch.manual_seed(0)
    model = MeanMap().eval()
    dense = count(model, SHAPE)
    assert dense.macs == DIM * 3 * 16 * 16 + 16 * 10
    filters = [g for g in build_groups(model, SHAPE, ("filter",)) if g.removable]
    assert len(filters) == DIM
    zero_groups(model, filters[:2])
    result, counted = assert_cut_as_counted(model, SHAPE, exported(model, SHAPE))
    assert counted.macs_after == (DIM - 2) * 3 * 16 * 16 + 16 * 10
    assert_thinned_exactly(model, SHAPE)
