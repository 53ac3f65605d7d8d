"""Property tests of the whole surgery: random small CNNs with random structured zeros.

Hypothesis draws an architecture (a stem Conv, then plain Conv-BN-activation blocks, some grouped,
depthwise or dilated, residual blocks, two-branch Concats, squeeze-excite gates, 1x1 convs and
pooling layers, then a pooled or flattened classifier with one or two Gemms) and random zero
masks over it: whole filters (the conv rows and the BN's gamma and beta: exactly zero channels),
BN-only zeros (gamma 0, beta not: constant channels), input channels of a conv, outer kernel rows
and columns across all filters, whole residual branches (the branch's last BN zero) and Gemm rows
and columns. BatchNorm running statistics are random.
Whatever is drawn, the compact model must compute what the uncut one computes in ONNX Runtime,
be a valid ONNX model and cost no more MACs than before (the report's MACs being those of the
graph's own Conv and Gemm layers, shapes as ORT computes them); without any zeros it must be the
uncut model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx
from sslcompress.surgery.verify import compare

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL_OF_MAX = 1e-4
PROPERTY = settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NO_ZEROS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Arch:
    in_ch: int
    size: int  # square input side
    stem: tuple[int, int, int, int, bool, bool]  # out, kernel, stride, pad, conv bias, BN
    blocks: tuple[tuple, ...]  # each a tuple whose first item names the kind
    head: str  # "gap" | "gmp" | "flatten" | "input" (an MLP on the flattened model input)
    hidden: int | None  # Gemm+ReLU+Gemm when set, one Gemm otherwise
    classes: int
    dynamic_batch: bool


@st.composite
def archs(draw) -> Arch:
    in_ch = draw(st.integers(1, 3))
    size0 = draw(st.sampled_from([6, 7, 8, 9]))
    width = st.integers(2, 6)
    k = draw(st.sampled_from([1, 3, 5]))
    pad = draw(st.sampled_from([0, k // 2]))
    stride = draw(st.sampled_from([1, 2]))
    c = draw(width)
    stem = (c, k, stride, pad, draw(st.booleans()), draw(st.booleans()))
    size = (size0 + 2 * pad - k) // stride + 1
    blocks: list[tuple] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["plain", "res", "concat", "pool", "conv1x1", "se"]))
        if kind == "plain":
            k = draw(st.sampled_from([1, 3]))
            dil = draw(st.sampled_from([1, 2])) if k > 1 else 1
            extent = dil * (k - 1) + 1
            pad = draw(st.sampled_from([0, k // 2, dil * (k // 2)])) if size >= extent else dil * (k // 2)
            s = draw(st.sampled_from([1, 2])) if size >= 4 else 1
            groups = draw(st.sampled_from([1, 1, 2, c]))  # grouped and depthwise convs too
            groups = groups if c % groups == 0 else 1
            out = groups * draw(st.integers(1, 2)) if groups > 2 else groups * max(1, draw(width) // groups)
            act = draw(st.sampled_from(list(ACTS)))
            blocks.append(("plain", out, k, s, pad, draw(st.booleans()), dil, groups, act))
            c, size = out, (size + 2 * pad - extent) // s + 1
        elif kind == "res":
            proj = draw(st.booleans())
            s = draw(st.sampled_from([1, 2])) if proj and size >= 4 else 1
            out = draw(width) if proj else c
            blocks.append(("res", out, s, proj))
            c, size = out, (size - 1) // s + 1
        elif kind == "concat":
            ka = draw(st.sampled_from([1, 3]))
            ca = draw(width)
            cb = draw(st.sampled_from([0, 2, 3]))  # 0: the second branch is a MaxPool of the input
            blocks.append(("concat", ca, ka, cb, draw(st.booleans()), draw(st.booleans())))
            c = ca + (cb or c)
        elif kind == "pool":
            p = draw(st.sampled_from(["avg3_incl", "avg3_excl", "max3"] + (["max2", "avg2"] if size >= 2 else [])))
            blocks.append(("pool", p))
            size = size // 2 if p in ("max2", "avg2") else size
        elif kind == "se":
            blocks.append(("se", draw(st.integers(1, 3))))
        else:
            out = draw(width)
            blocks.append(("conv1x1", out, draw(st.booleans())))
            c = out
    head = draw(st.sampled_from(["gap", "gmp", "flatten", "gap", "gmp", "flatten", "input"]))
    if head == "input":  # an MLP on the pixels: a Gemm whose input (the graph's) cannot lose features
        blocks = []
    hidden = draw(st.one_of(st.none(), st.integers(3, 8)))
    return Arch(in_ch, size0, stem, tuple(blocks), head, hidden, draw(st.integers(2, 4)), draw(st.booleans()))


# Activations, some of which map 0 to a nonzero constant (Sigmoid): zero channels become constant.
ACTS = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "leaky": lambda x: F.leaky_relu(x, 0.1),
    "hardswish": F.hardswish,
    "relu6": F.relu6,
}


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0, bias: bool = False,
                 bn: bool = True, relu: bool | str = True, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias, dilation=dilation,
                              groups=groups)
        self.bn = nn.BatchNorm2d(cout) if bn else None
        self.act = ACTS[relu] if isinstance(relu, str) else (torch.relu if relu else None)

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x) if self.act is not None else x


class SqueezeExcite(nn.Module):
    """x * sigmoid(conv(relu(conv(mean over space of x)))): a Mul by a (N, C, 1, 1) gate."""

    def __init__(self, c: int, r: int):
        super().__init__()
        self.down = ConvBN(c, r, 1, bias=True, bn=False)
        self.up = ConvBN(r, c, 1, bias=True, bn=False, relu="sigmoid")

    def forward(self, x):
        return x * self.up(self.down(F.adaptive_avg_pool2d(x, 1)))


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, proj: bool):
        super().__init__()
        self.c1 = ConvBN(cin, cout, 3, stride, 1)
        self.c2 = ConvBN(cout, cout, 3, 1, 1, relu=False)  # c2.bn is the branch's last BN
        self.shortcut = ConvBN(cin, cout, 1, stride, 0, relu=False) if proj else None

    def forward(self, x):
        short = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.c2(self.c1(x)) + short)


class Concat(nn.Module):
    def __init__(self, cin: int, ca: int, ka: int, cb: int, bn_after: bool, relu_after: bool):
        super().__init__()
        self.a = ConvBN(cin, ca, ka, 1, ka // 2)
        self.b = ConvBN(cin, cb, 3, 1, 1, bias=True) if cb else nn.MaxPool2d(3, 1, 1)
        self.bn = nn.BatchNorm2d(ca + (cb or cin)) if bn_after else None  # a BN that no Conv absorbs
        self.relu_after = relu_after

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        if self.bn is not None:
            y = self.bn(y)
        return torch.relu(y) if self.relu_after else y


POOLS = {
    "avg3_incl": lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=True),
    "avg3_excl": lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=False),
    "max3": lambda: nn.MaxPool2d(3, 1, 1),
    "max2": lambda: nn.MaxPool2d(2, 2),
    "avg2": lambda: nn.AvgPool2d(2, 2),
}


class Net(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        c, k, s, p, bias, bn = a.stem
        self.stem = ConvBN(a.in_ch, c, k, s, p, bias=bias, bn=bn)
        size = (a.size + 2 * p - k) // s + 1
        body: list[nn.Module] = []
        for blk in a.blocks:
            if blk[0] == "plain":
                _, out, k, s, p, bias, dil, groups, act = blk
                body.append(ConvBN(c, out, k, s, p, bias=bias, relu=act, dilation=dil, groups=groups))
                c, size = out, (size + 2 * p - dil * (k - 1) - 1) // s + 1
            elif blk[0] == "res":
                _, out, s, proj = blk
                body.append(Residual(c, out, s, proj))
                c, size = out, (size - 1) // s + 1
            elif blk[0] == "concat":
                _, ca, ka, cb, bn_after, relu_after = blk
                body.append(Concat(c, ca, ka, cb, bn_after, relu_after))
                c = ca + (cb or c)
            elif blk[0] == "pool":
                body.append(POOLS[blk[1]]())
                size = size // 2 if blk[1] in ("max2", "avg2") else size
            elif blk[0] == "se":
                body.append(SqueezeExcite(c, blk[1]))
            else:
                _, out, relu = blk
                body.append(ConvBN(c, out, 1, bias=True, bn=False, relu=relu))
                c = out
        self.body = nn.Sequential(*body)
        self.head = a.head
        features = {"flatten": c * size * size, "input": a.in_ch * a.size * a.size}.get(a.head, c)
        if a.hidden:
            self.fc = nn.Sequential(nn.Linear(features, a.hidden), nn.ReLU(), nn.Linear(a.hidden, a.classes))
        else:
            self.fc = nn.Sequential(nn.Linear(features, a.classes))

    def forward(self, x):
        if self.head == "input":
            return self.fc(torch.flatten(x, 1))
        x = self.body(self.stem(x))
        if self.head == "gap":
            x = F.adaptive_avg_pool2d(x, 1)
        elif self.head == "gmp":
            x = F.adaptive_max_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


# ---------------------------------------------------------------- zero masks


@dataclass(frozen=True)
class Masks:
    seed: int
    filters: float  # per output channel: conv row (+ bias) and BN gamma and beta zero
    constants: float  # per output channel: BN gamma zero, beta not (a conv without BN: row zero, bias not)
    inputs: float  # per input channel of a conv: the weight column zero
    lines: float  # per conv and side: the outer kernel row / column zero across all filters
    branches: float  # per residual block: its last BN's gamma and beta zero
    gemm_rows: float  # per Gemm output: the weight row zero, the bias zero or not
    gemm_cols: float  # per Gemm input: the weight column zero


PROB = st.sampled_from([0.0, 0.2, 0.5, 1.0])


@st.composite
def masks(draw) -> Masks:
    return Masks(draw(st.integers(0, 2**16)), *(draw(PROB) for _ in range(7)))


def _nonzero(rng: np.random.Generator, n: int) -> torch.Tensor:
    return torch.from_numpy((rng.uniform(0.2, 1.0, n) * rng.choice([-1, 1], n)).astype(np.float32))


@torch.no_grad()
def randomize_bn(model: nn.Module, rng: np.random.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.from_numpy(rng.uniform(-1, 1, n).astype(np.float32)))
            m.running_var.copy_(torch.from_numpy(rng.uniform(0.3, 2.0, n).astype(np.float32)))
            m.weight.copy_(_nonzero(rng, n) * 1.5)
            m.bias.copy_(torch.from_numpy(rng.uniform(-0.5, 0.5, n).astype(np.float32)))


@torch.no_grad()
def apply_masks(model: nn.Module, mk: Masks) -> None:
    rng = np.random.default_rng(mk.seed)

    def pick(n: int, p: float) -> torch.Tensor:
        return torch.from_numpy(rng.random(n) < p)

    for m in model.modules():
        if isinstance(m, ConvBN):
            w, b, bn = m.conv.weight, m.conv.bias, m.bn
            n_out, n_in, kh, kw = w.shape
            dead = pick(n_out, mk.filters)
            w[dead] = 0
            if b is not None:
                b[dead] = 0
            if bn is not None:
                bn.weight[dead] = 0
                bn.bias[dead] = 0
            const = pick(n_out, mk.constants)
            if bn is not None:
                bn.weight[const] = 0
                bn.bias[const] = _nonzero(rng, int(const.sum()))
            elif b is not None:
                w[const] = 0
                b[const] = _nonzero(rng, int(const.sum()))
            w[:, pick(n_in, mk.inputs)] = 0
            sides = pick(4, mk.lines)
            if kh > 1 and sides[0]:
                w[:, :, 0] = 0
            if kh > 1 and sides[1]:
                w[:, :, -1] = 0
            if kw > 1 and sides[2]:
                w[:, :, :, 0] = 0
            if kw > 1 and sides[3]:
                w[:, :, :, -1] = 0
        elif isinstance(m, Residual) and rng.random() < mk.branches:
            m.c2.bn.weight.zero_()
            m.c2.bn.bias.zero_()
        elif isinstance(m, Concat) and m.bn is not None:
            n = m.bn.num_features
            dead, const = pick(n, mk.filters / 2), pick(n, mk.constants / 2)
            m.bn.weight[dead | const] = 0
            m.bn.bias[dead] = 0
            m.bn.bias[const & ~dead] = _nonzero(rng, int((const & ~dead).sum()))
        elif isinstance(m, nn.Linear):
            rows = pick(m.out_features, mk.gemm_rows)
            m.weight[rows] = 0
            m.bias[rows & pick(m.out_features, 0.5)] = 0  # zero units, the others constant
            m.weight[:, pick(m.in_features, mk.gemm_cols)] = 0


# ---------------------------------------------------------------- helpers


def export(arch: Arch, mk: Masks | None) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    torch.manual_seed(mk.seed if mk else 0)
    model = Net(arch).eval()
    randomize_bn(model, np.random.default_rng(mk.seed + 1 if mk else 1))
    if mk is not None:
        apply_masks(model, mk)
    shape = (1, arch.in_ch, arch.size, arch.size)
    return export_onnx(model, shape, dynamic_batch=arch.dynamic_batch).model, shape


def true_macs(proto: onnx.ModelProto, x: np.ndarray) -> int:
    """Conv and Gemm MACs per sample, with every output shape as ORT computes it (no shape inference)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    known = {o.name for o in m.graph.output}
    layers = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    for node in layers:
        if node.output[0] not in known:
            m.graph.output.append(onnx.ValueInfoProto(name=node.output[0]))
            known.add(node.output[0])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    shapes = {n: v.shape for n, v in zip(names, sess.run(names, {sess.get_inputs()[0].name: x}))}
    weights = {i.name: tuple(i.dims) for i in m.graph.initializer}
    weights.update({n.output[0]: tuple(n.attribute[0].t.dims) for n in m.graph.node
                    if n.op_type == "Constant" and n.attribute[0].name == "value"})
    total = 0
    for node in layers:
        w = weights[node.input[1]]
        y = shapes[node.output[0]]
        spatial = int(np.prod(y[2:])) if node.op_type == "Conv" else int(np.prod(y[1:-1]))
        total += int(np.prod(w)) * spatial
    return total


def fresh_input(proto: onnx.ModelProto, shape: tuple[int, ...], dynamic: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 12345)
    batch = 3 if dynamic else shape[0]
    return (rng.standard_normal((batch, *shape[1:])) * 2).astype(np.float32)


# ---------------------------------------------------------------- properties


@PROPERTY
@given(archs(), masks())
def test_compact_model_matches_is_valid_and_never_costs_more(arch, mk):
    proto, shape = export(arch, mk)
    res = compress(proto, shape_lowering="off")
    # (a) it computes what the uncut model computes: the library's own check ...
    assert res.verification.passed, res.report["verification"]
    # ... and ours, on a fresh input of another batch size and scale
    x = fresh_input(proto, shape, arch.dynamic_batch, mk.seed)
    mine = compare(proto, res.model, [x], n_random=0, rtol_of_max=RTOL_OF_MAX)
    assert mine.max_abs <= RTOL_OF_MAX * mine.max_ref, (mine, res.report["verification"])
    # (b) a valid model
    onnx.checker.check_model(res.model, full_check=True)
    # (c) never more MACs, in total or per layer; and the report's MACs are the graph's own
    totals = res.report["totals"]
    assert totals["macs_after"] <= totals["macs"]
    for row in res.report["layers"]:
        assert row["macs_after"] <= row["macs"], row
    assert totals["macs"] == true_macs(proto, x)
    assert totals["macs_after"] == true_macs(res.model, x)


@NO_ZEROS
@given(archs(), st.integers(0, 2**16))
def test_without_zeros_nothing_changes(arch, seed):
    proto, shape = export(arch, Masks(seed, 0, 0, 0, 0, 0, 0, 0))
    res = compress(proto, shape_lowering="off")
    assert res.verification.passed
    assert res.verification.max_abs == 0.0
    onnx.checker.check_model(res.model, full_check=True)
    before = {i.name: list(i.dims) for i in proto.graph.initializer}
    after = {i.name: list(i.dims) for i in res.model.graph.initializer}
    assert {k: v for k, v in after.items() if k in before} == before
    # Constant nodes may become initializers (shape inference reads those); nothing else changes.
    ops = [n.op_type for n in proto.graph.node if n.op_type != "Constant"]
    assert [n.op_type for n in res.model.graph.node if n.op_type != "Constant"] == ops
    totals = res.report["totals"]
    assert totals["macs_after"] == totals["macs"] == true_macs(res.model, fresh_input(proto, shape, False, seed))
    assert totals["channels_removed"] == 0 and totals["params_after"] == totals["params"]
    assert res.report["blocks_removed"] == [] and res.report["constant_channels_folded"] == 0
    assert res.report["kernels_shrunk"] == {}


def with_constant_nodes(proto: onnx.ModelProto, seed: int, p: float) -> onnx.ModelProto:
    """The same model with some initializers moved into Constant nodes, as other exporters write them."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    moved = [t for t in out.graph.initializer if rng.random() < p]
    if not moved:
        return out
    names = {t.name for t in moved}
    keep = [t for t in out.graph.initializer if t.name not in names]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    nodes = [onnx.helper.make_node("Constant", [], [t.name], name=f"const_{i}",
                                   value=onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
             for i, t in enumerate(moved)]
    rest = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes + rest)
    onnx.checker.check_model(out, full_check=True)
    return out


@PROPERTY
@given(archs(), masks(), st.sampled_from([0.3, 1.0]))
def test_models_with_constant_nodes_compress_as_well(arch, mk, p):
    """Weights, biases and per-channel constants in Constant nodes: still exact, valid, no dearer,
    and the report counts the MACs of layers whose weight is a Constant node too."""
    proto, shape = export(arch, mk)
    proto = with_constant_nodes(proto, mk.seed, p)
    res = compress(proto, shape_lowering="off")
    assert res.verification.passed, res.report["verification"]
    x = fresh_input(proto, shape, arch.dynamic_batch, mk.seed)
    mine = compare(proto, res.model, [x], n_random=0, rtol_of_max=RTOL_OF_MAX)
    assert mine.max_abs <= RTOL_OF_MAX * mine.max_ref, mine
    onnx.checker.check_model(res.model, full_check=True)
    totals = res.report["totals"]
    assert totals["macs_after"] <= totals["macs"]
    assert totals["macs"] == true_macs(proto, x)
    assert totals["macs_after"] == true_macs(res.model, x)
