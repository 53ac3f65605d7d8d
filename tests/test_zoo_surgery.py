"""The surgery over the whole model zoo: random structured zeros, an exact compact model, and its
MACs equal to the torch-side count (flops.count), which reads the zero groups, not the graph.

Zeros are drawn the way SSL makes them: whole SSL groups from build_groups (filter groups own
the conv filter, its bias and the BN's gamma and beta, so a zero group is an exactly-zero
channel; channel groups own every fibre that reads a channel; a depth group owns a whole
residual branch; kernel_row / kernel_col groups the outer lines of a kernel), at several
densities. BatchNorm statistics and conv biases are random so that folding them matters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from sslcompress.finetune.groups import ParamGroup, build_groups
from sslcompress.flops import ModelCount, count
from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx
from sslcompress.surgery.verify import compare

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL_OF_MAX = 1e-4
DENSITIES = (0.25, 0.5, 0.75)
SLOW = pytest.mark.slow

# (in_channels, side): a small input each model exports at (ResNet-18/50 take 32x32: a few
# seconds each). AlexNet's and VGG's adaptive average pools export to ONNX only when their input
# is a multiple of the 6x6 / 7x7 output, which needs (about) the full 224x224 input, so those are
# `slow` and run at one density. Their classifiers are narrowed (see narrow_classifier).
ZOO: dict[str, tuple[int, int]] = {
    "lenet5": (1, 28),
    "mlp": (1, 28),
    "convnet": (3, 32),
    "resnet20": (3, 32),
    "resnet32": (3, 32),
    "resnet56": (3, 32),
    "resnet18": (3, 32),
    "resnet50": (3, 32),
    "alexnet": (3, 224),
    "vgg16": (3, 224),
    "vgg16_bn": (3, 224),
}
NARROW = ("alexnet", "vgg16", "vgg16_bn")
HIDDEN = 256
FAST = ("lenet5", "mlp", "convnet", "resnet20", "resnet32", "resnet56", "resnet18", "resnet50")
HAS_BRANCHES = ("resnet20", "resnet32", "resnet56", "resnet18", "resnet50")


def _cases():
    for name in FAST:
        for d in DENSITIES:
            yield pytest.param(name, d, id=f"{name}-{d}")
    for name in NARROW:
        yield pytest.param(name, 0.5, id=f"{name}-0.5", marks=SLOW)


# ---------------------------------------------------------------- zeroing groups


@torch.no_grad()
def zero_group(group: ParamGroup, params: dict[str, torch.Tensor]) -> None:
    """Set every slice of the group to exactly zero."""
    for s in group.slices:
        p = params[s.param]
        idx = list(s.index)
        if s.axis == "all":
            p.zero_()
        elif s.axis == "out":
            p[idx] = 0
        elif s.axis == "in":
            p[:, idx] = 0
        elif s.axis == "row":
            p[:, :, idx] = 0
        elif s.axis == "col":
            p[:, :, :, idx] = 0
        elif s.axis == "fiber":
            p.view(p.shape[0], -1)[:, idx] = 0
        else:  # pragma: no cover
            raise AssertionError(s.axis)


def narrow_classifier(model: nn.Module, hidden: int = HIDDEN) -> None:
    """AlexNet's and VGG's classifier with `hidden` units instead of 4096 in its two hidden layers.

    The 4096-wide layers hold 55M (AlexNet) and 120M (VGG-16) weights that only make the export,
    the surgery and the ONNX Runtime runs slow (30 s or more a model). The graph stays the same:
    flatten, three Gemms with ReLU and Dropout between, and the first Gemm still reads every
    feature of the 256x6x6 / 512x7x7 map, so the convs' zero channels still drop its columns.
    """
    layers = model.classifier
    first, middle, last = (i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    assert layers[middle].in_features == layers[middle].out_features == layers[last].in_features == 4096
    layers[first] = nn.Linear(layers[first].in_features, hidden)
    layers[middle] = nn.Linear(hidden, hidden)
    layers[last] = nn.Linear(hidden, layers[last].out_features)


@torch.no_grad()
def randomize(model: nn.Module, rng: np.random.Generator) -> None:
    """Trained-looking BN statistics, affine parameters and biases (nonzero, so zeros are ours)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.from_numpy(rng.uniform(-0.5, 0.5, n).astype(np.float32)))
            m.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, n).astype(np.float32)))
            m.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, n).astype(np.float32)))
            m.bias.copy_(torch.from_numpy(rng.uniform(-0.2, 0.2, n).astype(np.float32)))
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.copy_(torch.from_numpy(rng.uniform(0.01, 0.1, m.bias.shape).astype(np.float32)))


def sparsify(model: nn.Module, shape: tuple[int, ...], density: float, seed: int) -> dict[str, int]:
    """Zero `density` of the removable filter groups, a quarter as many channel groups, a few outer
    kernel lines and, where the model has residual branches, one whole branch."""
    rng = np.random.default_rng(seed)
    randomize(model, rng)
    params = dict(model.named_parameters())
    groups = build_groups(model, shape, ("filter", "channel", "depth", "kernel_row", "kernel_col"))
    chosen: dict[str, list[ParamGroup]] = {}
    filters = [g for g in groups if g.kind == "filter" and g.removable]
    chosen["filter"] = [filters[i] for i in rng.permutation(len(filters))[: round(density * len(filters))]]
    channels = [g for g in groups if g.kind == "channel" and g.removable]
    chosen["channel"] = [channels[i] for i in rng.permutation(len(channels))[: round(density / 4 * len(channels))]]
    lines = [g for g in groups if g.kind in ("kernel_row", "kernel_col") and _outer(g, params)]
    chosen["line"] = [lines[i] for i in rng.permutation(len(lines))[: max(1, len(lines) // 10)]] if lines else []
    depth = [g for g in groups if g.kind == "depth"]
    chosen["depth"] = [depth[int(rng.integers(len(depth)))]] if depth else []
    for gs in chosen.values():
        for g in gs:
            zero_group(g, params)
    return {k: len(v) for k, v in chosen.items()}


def _outer(group: ParamGroup, params: dict[str, torch.Tensor]) -> bool:
    """A kernel row/column group on the kernel's border (the kind a kernel shrink can drop)."""
    (s,) = group.slices
    extent = params[s.param].shape[2 if s.axis == "row" else 3]
    return s.index[0] in (0, extent - 1)


def onnx_layer_macs(proto: onnx.ModelProto) -> int:
    """Conv and Gemm MACs per sample of a graph, read from its own (inferred) shapes."""
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    total = 0
    for node in proto.graph.node:
        if node.op_type == "Conv":
            total += int(np.prod(inits[node.input[1]])) * int(np.prod(shapes[node.output[0]][2:]))
        elif node.op_type in ("Gemm", "MatMul"):
            total += int(np.prod(inits[node.input[1]]))
    return total


def check_compress(model: nn.Module, shape: tuple[int, ...], seed: int) -> dict:
    """Export, compress and check the compact model; its report."""
    proto = export_onnx(model, shape, dynamic_batch=True).model
    res = compress(proto, shape_lowering="off")
    assert res.verification.passed, res.report["verification"]
    x = (np.random.default_rng(seed + 7).standard_normal((2, *shape[1:])) * 2).astype(np.float32)
    mine = compare(proto, res.model, [x], n_random=0, rtol_of_max=RTOL_OF_MAX)
    assert mine.max_abs <= RTOL_OF_MAX * mine.max_ref, mine
    onnx.checker.check_model(res.model, full_check=True)
    assert res.report["totals"]["macs_after"] == onnx_layer_macs(res.model)
    return res.report


@dataclass(frozen=True)
class ZooRun:
    chosen: dict[str, int]
    report: dict
    expected: ModelCount  # flops.count of the sparsified torch model


@functools.cache
def zoo_run(name: str, density: float) -> ZooRun:
    """One sparsified model, compressed and checked; shared by the tests below."""
    in_ch, side = ZOO[name]
    shape = (1, in_ch, side, side)
    seed = int(density * 100) + len(name)
    torch.manual_seed(seed)
    model = build_model(ModelSpec(name, 10, in_ch, (side, side))).eval()
    if name in NARROW:
        narrow_classifier(model)
    chosen = sparsify(model, shape, density, seed)
    expected = count(model, shape)
    return ZooRun(chosen, check_compress(model, shape, seed), expected)


# ---------------------------------------------------------------- the zoo


@pytest.mark.parametrize(("name", "density"), list(_cases()))
def test_zoo_model_compresses_exactly(name, density):
    run = zoo_run(name, density)
    assert run.chosen["filter"] > 0
    totals = run.report["totals"]
    assert totals["macs"] == run.expected.macs
    assert totals["macs_after"] < totals["macs"]
    if run.chosen["line"]:
        assert run.report["kernels_shrunk"]
    if name in HAS_BRANCHES:
        assert run.chosen["depth"] == 1 and len(run.expected.blocks_removed) == 1
        assert len(run.report["blocks_removed"]) >= 1


@pytest.mark.parametrize(("name", "density"), list(_cases()))
def test_zoo_macs_after_equal_the_torch_count(name, density):
    run = zoo_run(name, density)
    got, want = run.report["totals"]["macs_after"], run.expected.macs_after
    assert got == want, {row["name"]: (row["weight"], row["weight_after"]) for row in run.report["layers"]}


# ---------------------------------------------------------------- torchvision


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_with_zero_filters_compress_and_match(arch):
    pytest.importorskip("torchvision")
    shape = (1, 3, 64, 64)
    torch.manual_seed(0)
    model = build_model(ModelSpec(f"torchvision:{arch}", 10, 3, (64, 64))).eval()
    rng = np.random.default_rng(0)
    randomize(model, rng)
    params = dict(model.named_parameters())
    filters = [g for g in build_groups(model, shape, ("filter",)) if g.removable]
    assert filters
    for i in rng.permutation(len(filters))[: len(filters) // 2]:
        zero_group(filters[i], params)
    report = check_compress(model, shape, 0)
    assert report["totals"]["macs_after"] < report["totals"]["macs"]
    if arch == "resnet18":  # no grouped convs: the torch-side count sees everything the surgery can do
        assert report["totals"]["macs_after"] == count(model, shape).macs_after
