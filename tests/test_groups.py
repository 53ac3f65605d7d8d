"""groups.build_groups: which weight slices each SSL group owns, its size, cost and removability."""

from __future__ import annotations

import pytest
import torch

from sslcompress.errors import ConfigError
from sslcompress.finetune.groups import KINDS, Slice, build_groups, parse_kinds
from sslcompress.finetune.structure import analyze
from sslcompress.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


LENET_SHAPE = (1, 1, 28, 28)
R20_SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return build_model(ModelSpec("lenet5", 10, 1, (28, 28)))


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    return build_model(ModelSpec("resnet20", 10, 3, (32, 32)))


@pytest.fixture(scope="module")
def r20_groups(r20):
    return build_groups(r20, R20_SHAPE, ("filter", "channel", "depth", "shape"))


def of(groups, kind, layer=None):
    return [g for g in groups if g.kind == kind and (layer is None or g.layers[:1] == (layer,))]


# ---------------------------------------------------------------- LeNet filter / channel


def test_lenet_filter_groups(lenet):
    groups = build_groups(lenet, LENET_SHAPE, ("filter",))
    assert all(g.kind == "filter" for g in groups)
    assert len(groups) == 20 + 50 + 500 + 10
    conv1 = of(groups, "filter", "conv1")
    assert len(conv1) == 20
    for n, g in enumerate(conv1):
        assert set(g.slices) == {Slice("conv1.weight", "out", (n,)), Slice("conv1.bias", "out", (n,))}
        assert g.size == 1 * 5 * 5 + 1 == 26
        assert g.cost == 25 * 24 * 24  # bias adds are not MACs
        assert g.removable and g.reason == ""
        assert g.layers == ("conv1",)
    conv2 = of(groups, "filter", "conv2")
    assert len(conv2) == 50
    assert conv2[7].size == 20 * 25 + 1 and conv2[7].cost == 20 * 25 * 8 * 8 == 32000
    assert set(conv2[7].slices) == {Slice("conv2.weight", "out", (7,)), Slice("conv2.bias", "out", (7,))}
    fc1 = of(groups, "filter", "fc1")
    assert len(fc1) == 500 and all(g.removable for g in fc1)
    assert fc1[0].size == 801 and fc1[0].cost == 800
    fc2 = of(groups, "filter", "fc2")
    assert len(fc2) == 10
    assert not any(g.removable for g in fc2)
    assert all(g.reason == "model output" for g in fc2)
    # each filter group names a distinct channel
    assert len({g.channel for g in groups}) == len(groups)


def test_lenet_channel_groups(lenet):
    groups = build_groups(lenet, LENET_SHAPE, ("channel",))
    assert all(g.kind == "channel" and g.removable for g in groups)
    # conv1 reads the model input: no channel group there
    assert not any("conv1.weight" in {s.param for s in g.slices} for g in groups)
    assert len(groups) == 20 + 50 + 500
    conv2 = of(groups, "channel", "conv2")
    assert len(conv2) == 20
    for c, g in enumerate(conv2):
        assert g.slices == (Slice("conv2.weight", "in", (c,)),)
        assert g.size == 50 * 5 * 5
        assert g.cost == 50 * 25 * 8 * 8
    fc1 = of(groups, "channel", "fc1")
    assert len(fc1) == 50
    for c, g in enumerate(fc1):
        # conv2's channel c is 4x4 = 16 consecutive features of the flattened map
        assert g.slices == (Slice("fc1.weight", "in", tuple(range(c * 16, c * 16 + 16))),)
        assert g.size == 500 * 16 and g.cost == 500 * 16
    fc2 = of(groups, "channel", "fc2")
    assert len(fc2) == 500
    assert fc2[3].slices == (Slice("fc2.weight", "in", (3,)),) and fc2[3].size == 10


def test_lenet_filter_and_channel_groups_share_channel(lenet):
    groups = build_groups(lenet, LENET_SHAPE, ("filter", "channel"))
    f1 = of(groups, "filter", "conv1")
    c2 = of(groups, "channel", "conv2")
    assert [g.channel for g in f1] == [g.channel for g in c2]
    f2 = of(groups, "filter", "conv2")
    c_fc1 = of(groups, "channel", "fc1")
    assert [g.channel for g in f2] == [g.channel for g in c_fc1]


def test_lenet_shape_and_kernel_line_groups(lenet):
    groups = build_groups(lenet, LENET_SHAPE, ("shape", "kernel_row", "kernel_col"))
    shape = of(groups, "shape")
    assert len(shape) == 1 * 25 + 20 * 25
    conv2 = of(groups, "shape", "conv2")
    assert len(conv2) == 500
    for c, m, k in [(0, 0, 0), (3, 2, 4), (19, 4, 4)]:
        g = conv2[c * 25 + m * 5 + k]
        assert g.slices == (Slice("conv2.weight", "fiber", (c * 25 + m * 5 + k,)),)
        assert g.size == 50 and g.cost == 50 * 64 and g.removable
        # the fiber is W[:, c, m, k]
        w = lenet.conv2.weight
        assert torch.equal(w.flatten(1)[:, g.slices[0].index[0]], w[:, c, m, k])
    rows = of(groups, "kernel_row", "conv2")
    cols = of(groups, "kernel_col", "conv2")
    assert [g.slices for g in rows] == [(Slice("conv2.weight", "row", (m,)),) for m in range(5)]
    assert [g.slices for g in cols] == [(Slice("conv2.weight", "col", (k,)),) for k in range(5)]
    assert rows[0].size == 50 * 20 * 5 and rows[0].cost == 50 * 20 * 5 * 64
    assert len(of(groups, "kernel_row")) == 10 and len(of(groups, "kernel_col")) == 10
    assert of(groups, "kernel_col", "conv1")[2].size == 20 * 1 * 5
    # only the requested kinds
    assert {g.kind for g in build_groups(lenet, LENET_SHAPE, ("kernel_row",))} == {"kernel_row"}


# ---------------------------------------------------------------- resnet20


def test_resnet20_filter_group_couples_stage(r20_groups):
    stem = [g for g in of(r20_groups, "filter") if Slice("conv1.weight", "out", (5,)) in g.slices]
    assert len(stem) == 1
    g = stem[0]
    convs = ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    bns = ["bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"]
    expect = {Slice(f"{c}.weight", "out", (5,)) for c in convs}
    expect |= {Slice(f"{b}.{p}", "out", (5,)) for b in bns for p in ("weight", "bias")}
    assert set(g.slices) == expect
    assert len(g.slices) == 4 + 8
    assert set(g.layers) == set(convs)
    assert g.size == 3 * 9 + 3 * 16 * 9 + 8
    assert g.cost == (3 * 9 + 3 * 16 * 9) * 32 * 32
    assert g.removable
    # the stage-2 stream couples the projection too
    s2 = [g for g in of(r20_groups, "filter") if Slice("layer2.0.downsample.0.weight", "out", (0,)) in g.slices]
    assert len(s2) == 1
    params = {s.param for s in s2[0].slices}
    assert params == {"layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "layer2.0.downsample.1.bias"} | {
        f"layer2.{i}.{p}" for i in range(3) for p in ("conv2.weight", "bn2.weight", "bn2.bias")}
    assert s2[0].cost == (16 * 1 + 3 * 32 * 9) * 16 * 16


def test_resnet20_group_counts(r20_groups):
    filt = of(r20_groups, "filter")
    # streams 16 + 32 + 64, inner channels 3*(16+32+64), fc 10 (model output, not removable)
    assert len(filt) == 16 + 32 + 64 + 3 * (16 + 32 + 64) + 10
    assert sum(not g.removable for g in filt) == 10
    chan = of(r20_groups, "channel")
    # every channel except the input and the fc output is read by someone
    assert len(chan) == 16 + 32 + 64 + 3 * (16 + 32 + 64)
    s1 = [g for g in chan if Slice("layer1.0.conv1.weight", "in", (0,)) in g.slices][0]
    assert {s.param for s in s1.slices} == {f"layer1.{i}.conv1.weight" for i in range(3)} | {
        "layer2.0.conv1.weight", "layer2.0.downsample.0.weight"}
    assert s1.size == 3 * 16 * 9 + 32 * 9 + 32


def test_resnet20_depth_groups(r20, r20_groups):
    depth = of(r20_groups, "depth")
    blocks = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert len(depth) == 9
    assert [g.name for g in depth] == [f"depth {b}" for b in blocks]
    params = dict(r20.named_parameters())
    for b, g in zip(blocks, depth, strict=True):
        expect = {f"{b}.{m}.{p}" for m, p in [("conv1", "weight"), ("bn1", "weight"), ("bn1", "bias"),
                                               ("conv2", "weight"), ("bn2", "weight"), ("bn2", "bias")]}
        assert {s.param for s in g.slices} == expect
        assert all(s.axis == "all" for s in g.slices)
        assert not any("downsample" in s.param for s in g.slices)
        assert g.removable
        assert g.size == sum(params[p].numel() for p in expect)
    w = {1: 16, 2: 32, 3: 64}
    assert depth[0].size == 2 * 16 * 16 * 9 + 4 * 16
    assert depth[3].size == 32 * 16 * 9 + 32 * 32 * 9 + 4 * 32
    hw = {1: 32 * 32, 2: 16 * 16, 3: 8 * 8}
    assert depth[4].cost == 2 * w[2] * w[2] * 9 * hw[2]


def test_resnet20_shape_groups(r20_groups):
    shape = of(r20_groups, "shape")
    # C*kh*kw per 3x3 conv; the two 1x1 projections have none
    expected = 3 * 9 + 6 * 16 * 9 + (16 * 9 + 5 * 32 * 9) + (32 * 9 + 5 * 64 * 9)
    assert len(shape) == expected == 5643
    assert not of(r20_groups, "shape", "layer2.0.downsample.0")
    assert not of(r20_groups, "shape", "fc")
    assert len(of(r20_groups, "shape", "layer3.0.conv1")) == 32 * 9
    g = of(r20_groups, "shape", "layer3.0.conv1")[100]
    assert g.size == 64 and g.cost == 64 * 8 * 8


def test_resnet18_and_50_depth_groups():
    r18 = build_model(ModelSpec("resnet18", 10, 3, (64, 64)))
    d18 = build_groups(r18, (1, 3, 64, 64), ("depth",))
    assert [g.name for g in d18] == [f"depth layer{s}.{i}" for s in (1, 2, 3, 4) for i in range(2)]
    assert {s.param.rsplit(".", 1)[0] for s in d18[2].slices} == {
        "layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2", "layer2.0.bn2"}
    r50 = build_model(ModelSpec("resnet50", 10, 3, (64, 64)))
    st = analyze(r50, (1, 3, 64, 64))
    d50 = build_groups(r50, (1, 3, 64, 64), ("depth",), structure=st)
    assert len(d50) == 3 + 4 + 6 + 3
    for g in d50:
        blk = g.name.removeprefix("depth ")
        mods = {s.param.rsplit(".", 1)[0] for s in g.slices}
        assert mods == {f"{blk}.{m}" for m in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")}
    # bottleneck widths: layer1 streams are 256 wide and the projection couples into them
    f = [g for g in build_groups(r50, (1, 3, 64, 64), ("filter",), structure=st)
         if Slice("layer1.0.downsample.0.weight", "out", (0,)) in g.slices]
    assert len(f) == 1
    assert {s.param for s in f[0].slices if s.param.endswith("conv3.weight")} == {
        f"layer1.{i}.conv3.weight" for i in range(3)}


# ---------------------------------------------------------------- parse_kinds


def test_parse_kinds():
    assert parse_kinds("filter,channel") == ("filter", "channel")
    assert parse_kinds(" filter , shape ") == ("filter", "shape")
    assert parse_kinds("all") == KINDS
    assert parse_kinds(["depth", "depth", "filter"]) == ("depth", "filter")
    assert parse_kinds(("kernel_row", "kernel_col")) == ("kernel_row", "kernel_col")
    for bad in ("filters", "filter,bogus", "", [], ["all", "filter"], "filter,,channel"):
        with pytest.raises(ConfigError):
            parse_kinds(bad)
