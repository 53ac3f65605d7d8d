"""structure.analyze: channel ids, layers, residual coupling, branches and walls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslcompress.errors import UnsupportedModelError
from sslcompress.finetune.structure import analyze
from sslcompress.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- helpers


def roots(st, ids):
    return [st.root(i) for i in ids]


def lenet():
    torch.manual_seed(0)
    return build_model(ModelSpec("lenet5", 10, 1, (28, 28)))


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus an identity or a 1x1 conv + BN projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut_first: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.shortcut_first = shortcut_first

    def forward(self, x):
        sc = x if self.proj is None else self.proj(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out = sc + out if self.shortcut_first else out + sc
        return torch.relu(out)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(4)
        self.b1 = Block(4, 4)
        self.b2 = Block(4, 4, shortcut_first=True)
        self.b3 = Block(4, 6, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.b3(self.b2(self.b1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------- LeNet


def test_lenet_layers_shapes_and_ids():
    st = analyze(lenet(), (1, 1, 28, 28))
    assert list(st.layers) == ["conv1", "conv2", "fc1", "fc2"]
    L = st.layers
    assert [L[n].kind for n in L] == ["conv", "conv", "linear", "linear"]
    assert L["conv1"].weight_shape == (20, 1, 5, 5)
    assert L["conv2"].weight_shape == (50, 20, 5, 5)
    assert L["fc1"].weight_shape == (500, 800)
    assert L["fc2"].weight_shape == (10, 500)
    # 28 -conv5-> 24 -pool2-> 12 -conv5-> 8 -pool2-> 4
    assert L["conv1"].out_hw == (24, 24)
    assert L["conv2"].out_hw == (8, 8)
    assert L["fc1"].out_hw == (1, 1)
    assert L["fc2"].out_hw == (1, 1)
    assert all(L[n].has_bias for n in L)
    assert [len(L[n].in_ids) for n in L] == [1, 20, 800, 500]
    assert [len(L[n].out_ids) for n in L] == [20, 50, 500, 10]
    # pooling and ReLU keep ids
    assert L["conv2"].in_ids == L["conv1"].out_ids
    assert L["fc2"].in_ids == L["fc1"].out_ids
    # every layer writes fresh, distinct ids
    outs = [r for n in L for r in roots(st, L[n].out_ids)]
    assert len(set(outs)) == len(outs) == 20 + 50 + 500 + 10
    assert st.branches == []
    assert st.norms == {}
    # macs property: per layer
    assert L["conv1"].macs == 20 * 1 * 25 * 24 * 24
    assert L["conv1"].macs_per_weight == 24 * 24
    assert L["fc1"].macs_per_weight == 1


def test_lenet_flatten_maps_feature_to_channel():
    st = analyze(lenet(), (1, 1, 28, 28))
    conv2 = roots(st, st.layers["conv2"].out_ids)
    fc1_in = roots(st, st.layers["fc1"].in_ids)
    hw = 4 * 4
    assert fc1_in == [conv2[f // hw] for f in range(800)]


def test_lenet_pins_only_input_and_output():
    st = analyze(lenet(), (1, 1, 28, 28))
    L = st.layers
    for i in L["fc2"].out_ids:
        assert st.pin_reason(i) == "model output"
    for name in ("conv1", "conv2", "fc1"):
        assert all(st.pin_reason(i) is None for i in L[name].out_ids), name
    assert st.pin_reason(L["conv1"].in_ids[0]) == "model input"
    assert set(st.pinned.values()) == {"model input", "model output"}
    assert len(st.pinned) == 1 + 10


class NonSquareFlatten(nn.Module):
    def __init__(self, use_view: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, (2, 1))
        self.fc = nn.Linear(3 * 3 * 5, 4)
        self.use_view = use_view

    def forward(self, x):
        y = self.conv(x)  # (N, 3, 3, 5)
        y = y.view(y.size(0), -1) if self.use_view else torch.flatten(y, 1)
        return self.fc(y)


@pytest.mark.parametrize("use_view", [False, True])
def test_flatten_non_square(use_view):
    st = analyze(NonSquareFlatten(use_view), (2, 2, 4, 5))
    assert st.layers["conv"].out_hw == (3, 5)
    conv = roots(st, st.layers["conv"].out_ids)
    fc_in = roots(st, st.layers["fc"].in_ids)
    assert fc_in == [conv[f // 15] for f in range(45)]
    assert all(st.pin_reason(i) is None for i in st.layers["conv"].out_ids)


def test_mlp_input_pixels_get_own_ids():
    m = build_model(ModelSpec("mlp", 10, 1, (28, 28)))
    st = analyze(m, (1, 1, 28, 28))
    fc1_in = roots(st, st.layers["fc1"].in_ids)
    assert len(set(fc1_in)) == 784
    assert all(st.pin_reason(i) is None for i in st.layers["fc1"].in_ids)


# ---------------------------------------------------------------- residual coupling


def test_residual_adds_merge_summand_ids():
    st = analyze(TinyResNet(), (1, 3, 8, 8))
    L, N = st.layers, st.norms
    stem = roots(st, L["stem"].out_ids)
    assert len(set(stem)) == 4
    # block 1 (identity, out + x), block 2 (identity, x + out): their last conv and BN share the stem ids
    for b in ("b1", "b2"):
        assert roots(st, L[f"{b}.conv2"].out_ids) == stem
        assert roots(st, N[f"{b}.bn2"].ids) == stem
        assert roots(st, L[f"{b}.conv1"].in_ids) == stem
        # the inner channels are their own
        inner = roots(st, L[f"{b}.conv1"].out_ids)
        assert not set(inner) & set(stem)
        assert roots(st, N[f"{b}.bn1"].ids) == inner
    assert roots(st, N["stem_bn"].ids) == stem
    # block 3 (projection): the projection conv and the last conv write the same ids, new ones
    b3 = roots(st, L["b3.conv2"].out_ids)
    assert roots(st, L["b3.proj.0"].out_ids) == b3
    assert roots(st, N["b3.proj.1"].ids) == b3
    assert roots(st, N["b3.bn2"].ids) == b3
    assert len(set(b3)) == 6 and not set(b3) & set(stem)
    assert roots(st, L["b3.proj.0"].in_ids) == stem
    assert roots(st, L["b3.conv1"].in_ids) == stem
    # flatten of a 1x1 map: feature f is channel f
    assert roots(st, L["fc"].in_ids) == b3
    assert st.layers["b3.conv1"].out_hw == (4, 4)
    assert all(st.pin_reason(i) is None for i in L["stem"].out_ids + L["b3.conv2"].out_ids)


def test_residual_branches_are_the_non_shortcut_side():
    st = analyze(TinyResNet(), (1, 3, 8, 8))
    assert len(st.branches) == 3
    mods = [b.modules for b in st.branches]
    assert mods == [[f"{b}.conv1", f"{b}.bn1", f"{b}.conv2", f"{b}.bn2"] for b in ("b1", "b2", "b3")]
    assert len({b.add_node for b in st.branches}) == 3


def test_resnet20_branches():
    m = build_model(ModelSpec("resnet20", 10, 3, (32, 32)))
    st = analyze(m, (1, 3, 32, 32))
    blocks = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert [b.modules for b in st.branches] == [
        [f"{blk}.conv1", f"{blk}.bn1", f"{blk}.conv2", f"{blk}.bn2"] for blk in blocks
    ]
    # three residual streams (16, 32, 64 channels) + 9 inner channel sets
    stem = set(roots(st, st.layers["conv1"].out_ids))
    for i in range(3):
        assert set(roots(st, st.layers[f"layer1.{i}.conv2"].out_ids)) == stem
    s2 = roots(st, st.layers["layer2.0.downsample.0"].out_ids)
    assert roots(st, st.layers["layer2.2.conv2"].out_ids) == s2
    assert len(set(s2)) == 32


# ---------------------------------------------------------------- walls


class Wall(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.c1 = nn.Conv2d(3, 4, 3)
        self.c2 = nn.Conv2d(4, 5, 3)
        self.sig = nn.Sigmoid()
        self.lrn = nn.LocalResponseNorm(2)

    def forward(self, x):
        y = self.c1(x)
        if self.kind == "sigmoid":
            y = torch.sigmoid(y)
        elif self.kind == "sort":
            y = torch.sort(y, dim=1)[0]
        elif self.kind == "module":
            y = self.sig(y)
        elif self.kind == "lrn":
            y = self.lrn(y)
        elif self.kind == "add_const":
            y = y + 1.0
        elif self.kind == "getitem":
            y = y[:, [1, 0, 3, 2]]
        return self.c2(y)


@pytest.mark.parametrize("kind,word", [
    ("sigmoid", "sigmoid"), ("sort", "sort"), ("module", "sigmoid"), ("lrn", "localresponsenorm"),
    ("add_const", "add"), ("getitem", "index"),
])
def test_unknown_op_pins_what_it_reads(kind, word):
    st = analyze(Wall(kind), (1, 3, 10, 10))
    L = st.layers
    assert set(L) == {"c1", "c2"}, "a layer behind a wall must still be counted"
    for i in L["c1"].out_ids:
        reason = st.pin_reason(i)
        assert reason, f"{kind}: c1 channel {i} should be pinned"
        assert word in reason.lower()
    # what comes out of the wall is pinned too, and has no relation to c1's ids
    assert all(st.pin_reason(i) for i in L["c2"].in_ids)
    assert len(L["c2"].in_ids) == 4
    assert not set(roots(st, L["c2"].in_ids)) & set(roots(st, L["c1"].out_ids))
    assert L["c2"].out_hw == (6, 6)


def test_known_ops_do_not_pin():
    st = analyze(Wall("none"), (1, 3, 10, 10))
    assert st.layers["c2"].in_ids == st.layers["c1"].out_ids
    assert all(st.pin_reason(i) is None for i in st.layers["c1"].out_ids)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3)
        self.g = nn.Conv2d(4, 8, 3, groups=2)
        self.c3 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c3(self.g(self.c1(x)))


def test_grouped_conv_channels_are_not_pinned():
    # Which of them an export deletes is decided on the weights (tests/test_grouped_and_shuffle.py).
    st = analyze(Grouped(), (1, 3, 9, 9))
    L = st.layers
    assert L["g"].groups == 2 and L["g"].weight_shape == (8, 2, 3, 3) and L["g"].grouped
    for i in L["c1"].out_ids + L["g"].out_ids:
        assert st.pin_reason(i) is None
    assert L["c3"].in_ids == L["g"].out_ids
    assert L["g"].macs == 8 * 2 * 9 * 5 * 5


class Cat(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.c = nn.Conv2d(5 if dim in (1, -3) else 2, 4, 1)
        self.dim = dim

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x) if self.dim in (1, -3) else self.a(x) * 2.0], dim=self.dim)
        return self.c(y)


@pytest.mark.parametrize("dim", [1, -3])
def test_cat_along_channels_concatenates_ids(dim):
    st = analyze(Cat(dim), (1, 3, 4, 4))
    L = st.layers
    assert L["c"].in_ids == L["a"].out_ids + L["b"].out_ids
    assert all(st.pin_reason(i) is None for i in L["c"].in_ids)


def test_cat_along_batch_pins():
    st = analyze(Cat(0), (1, 3, 4, 4))
    assert all("concatenation" in st.pin_reason(i) for i in st.layers["a"].out_ids)


class Scale(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)
        self.how = how

    def forward(self, x):
        y = self.a(x)
        if self.how == "two":
            y = y * self.b(x)
        elif self.how == "mul":
            y = y * 2.0
        elif self.how == "div":
            y = y / 4
        elif self.how == "kwarg":
            y = torch.mul(y, other=2.0)
        elif self.how == "method":
            y = y.mul(0.5)
        return self.c(y)


@pytest.mark.parametrize("how", ["mul", "div", "kwarg", "method"])
def test_scale_by_constant_keeps_ids(how):
    st = analyze(Scale(how), (1, 3, 4, 4))
    assert st.layers["c"].in_ids == st.layers["a"].out_ids
    assert all(st.pin_reason(i) is None for i in st.layers["a"].out_ids)


def test_product_of_tensors_pins():
    st = analyze(Scale("two"), (1, 3, 4, 4))
    for name in ("a", "b"):
        assert all("two tensors" in st.pin_reason(i) for i in st.layers[name].out_ids)
    assert all(st.pin_reason(i) for i in st.layers["c"].in_ids)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.c(x)
        return self.c(-x)


def test_untraceable_model_raises():
    with pytest.raises(UnsupportedModelError, match="trace"):
        analyze(DataDependent(), (1, 3, 8, 8))


def test_wrong_input_shape_raises():
    with pytest.raises(UnsupportedModelError):
        analyze(lenet(), (1, 3, 28, 28))


def test_analyze_restores_training_mode():
    m = TinyResNet().train()
    analyze(m, (1, 3, 8, 8))
    assert m.training and m.b1.bn1.training
    m.eval()
    analyze(m, (1, 3, 8, 8))
    assert not m.training
    # mixed modes (a frozen BN inside a training model) survive too
    m.train()
    m.b1.bn1.eval()
    analyze(m, (1, 3, 8, 8))
    assert m.training and m.b2.bn1.training and not m.b1.bn1.training
    # and shape propagation does not touch BN running statistics
    assert torch.equal(m.b1.bn1.running_mean, torch.zeros(4)) and int(m.b1.bn1.num_batches_tracked) == 0


class PlainBN(nn.Module):
    """conv -> BatchNorm without affine parameters -> conv, plus a residual block ending in one."""

    def __init__(self, affine: bool):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, affine=affine)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4, affine=affine)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        y = y + self.bn2(self.c2(y))
        return self.head(y)


def test_batchnorm_without_affine_is_not_zero_preserving():
    torch.manual_seed(0)
    m = PlainBN(affine=False)
    with torch.no_grad():
        m.bn.running_mean.fill_(0.5)
        m.c1.weight[0].zero_()
        m.c1.bias[0].zero_()
    m.eval()
    # the "zero" filter does not give a zero channel after the norm: it cannot be deleted exactly
    out = m.bn(m.c1(torch.randn(1, 3, 5, 5)))
    assert bool((out[:, 0] != 0).all())
    st = analyze(m, (1, 3, 5, 5))
    assert all("without affine" in st.pin_reason(i) for i in st.layers["c1"].out_ids)
    assert st.branches == []  # a zero branch would still add -mean/std

    st = analyze(PlainBN(affine=True), (1, 3, 5, 5))
    assert all(st.pin_reason(i) is None for i in st.layers["c1"].out_ids)
    assert [b.modules for b in st.branches] == [["c2", "bn2"]]
