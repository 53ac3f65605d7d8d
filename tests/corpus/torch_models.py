"""Corpus entries from torch nets of our own, through every exporter and export option users pick.

`Net` is written the way PyTorch code is written: `F.pad` before the stem conv, BN + ReLU,
residual blocks with identity shortcuts, a squeeze-excitation block with Linear layers
(`b, c, _, _ = x.size()`, `x.mean((2, 3))`, `.view(b, c, 1, 1)`, `.expand_as(x)`), a conv with a
zero-initialised bias, and `x.view(x.size(0), -1)` before the classifier (or `x.mean((2, 3))`
where the spatial size is dynamic). Its weighted layers, in forward order:

    0 stem       conv 3->8 (after F.pad) + BN + ReLU
    1 block1.c1  conv 8->8 + BN + ReLU        planted: filters 2, 6 (conv rows, BN gamma and beta)
    2 block1.c2  conv 8->8 + BN, + shortcut
    3 block2.c1  conv 8->8 + BN + ReLU        the whole branch is zero: both convs must go
    4 block2.c2  conv 8->8 + BN, + shortcut   planted: all (conv weight, BN gamma and beta zero)
    5 down       conv 8->16 /2 + BN + ReLU    planted: filters 0, 3, 9, 12
    6 se.fc1     Linear 16->4 + ReLU          reads the zero channels: loses those inputs only
    7 se.fc2     Linear 4->16 + Sigmoid       gate of zero channels: no one needs it (derived: 12)
    8 conv       conv 16->8 + bias + ReLU     planted: filters 1, 4 (rows and bias)
    9 fc         Linear 512->10 (or 8->10)    loses the zero channels' H*W inputs

With the legacy exporter, the zero-initialised conv bias equals block2.c2's zero (folded) bias,
or block2.c2's zero BN gamma its zero beta: the exporter keeps one initializer and reads the
other through an Identity node.

BatchNorm statistics, gammas and betas are random and nonzero, so every zero is a planted one.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from . import Entry

SIDE = 16
OPSETS = (9, 11, 13, 17)
NEWEST_LEGACY = 23  # torch 2.13's TorchScript exporter goes up to opset 23 (24 is refused)


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1 = ConvBN(c, c)
        self.c2 = ConvBN(c, c, relu=False)

    def forward(self, x):
        return F.relu(x + self.c2(self.c1(x)))


class SE(nn.Module):
    def __init__(self, c: int, r: int):
        super().__init__()
        self.fc1 = nn.Linear(c, c // r)
        self.fc2 = nn.Linear(c // r, c)

    def forward(self, x):
        b, c, _, _ = x.size()
        y = x.mean((2, 3))
        y = torch.sigmoid(self.fc2(F.relu(self.fc1(y)))).view(b, c, 1, 1)
        return x * y.expand_as(x)


class Net(nn.Module):
    def __init__(self, head: str = "flatten"):
        super().__init__()
        self.stem = ConvBN(3, 8, pad=0)
        self.block1 = Block(8)
        self.block2 = Block(8)
        self.down = ConvBN(8, 16, stride=2)
        self.se = SE(16, 4)
        self.conv = nn.Conv2d(16, 8, 3, 1, 1, bias=True)
        nn.init.zeros_(self.conv.bias)
        self.head = head
        self.fc = nn.Linear(8 * (SIDE // 2) ** 2 if head == "flatten" else 8, 10)

    def forward(self, x):
        x = F.pad(x, (1, 1, 1, 1))
        x = self.block2(self.block1(self.stem(x)))
        x = self.se(self.down(x))
        x = F.relu(self.conv(x))
        x = x.view(x.size(0), -1) if self.head == "flatten" else x.mean((2, 3))
        return self.fc(x)


NET_PLANTED = {1: (2, 6), 4: tuple(range(8)), 5: (0, 3, 9, 12), 8: (1, 4)}
NET_REMOVED = frozenset({3, 4})
NET_EXPECT = {0: 8, 1: 6, 2: 8, 5: 12, 6: 4, 7: 12, 8: 6, 9: 10}
# Inputs: block1.c2 reads block1.c1's zero channels, se.fc1 and conv read down's (times the gate),
# fc reads conv's: 6 channels x 8 x 8 positions after the flatten, 6 features after the mean.
NET_EXPECT_IN = {0: 3, 1: 8, 2: 6, 5: 8, 6: 12, 7: 4, 8: 12}


class Twins(nn.Module):
    """Duplicates the legacy exporter deduplicates into one initializer read through Identity
    nodes: two convs with identical all-zero biases, two wholly zeroed identical residual
    branches (zero conv weights, zero BN gammas and betas).

        0 stem conv 3->8 + BN + ReLU
        1 a    conv 8->8, zero bias, + ReLU    planted: filters 0, 5
        2 b    conv 8->8, zero bias, + ReLU    planted: filters 0, 5
        3, 4   z1 branch: c2 planted all       removed
        5, 6   z2 branch: c2 planted all       removed
        7 fc   Linear 8->10 after x.mean((2, 3))
    """

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.a = nn.Conv2d(8, 8, 3, 1, 1)
        self.b = nn.Conv2d(8, 8, 3, 1, 1)
        nn.init.zeros_(self.a.bias)
        nn.init.zeros_(self.b.bias)
        self.z1 = Block(8)
        self.z2 = Block(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.b(F.relu(self.a(self.stem(x)))))
        x = self.z2(self.z1(x))
        return self.fc(x.mean((2, 3)))


TWINS_PLANTED = {1: (0, 5), 2: (0, 5), 4: tuple(range(8)), 6: tuple(range(8))}
TWINS_REMOVED = frozenset({3, 4, 5, 6})
TWINS_EXPECT = {0: 8, 1: 6, 2: 6, 7: 10}
TWINS_EXPECT_IN = {0: 3, 1: 8, 2: 6, 7: 6}


# ---------------------------------------------------------------- planting zeros


def _nonzero(rng: np.random.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.from_numpy((rng.uniform(lo, hi, n) * rng.choice([-1, 1], n)).astype(np.float32))


@torch.no_grad()
def _randomize(model: nn.Module, rng: np.random.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.from_numpy(rng.uniform(-0.5, 0.5, n).astype(np.float32)))
            m.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, n).astype(np.float32)))
            m.weight.copy_(_nonzero(rng, n, 0.5, 1.5))
            m.bias.copy_(_nonzero(rng, n, 0.05, 0.3))
        elif isinstance(m, nn.Linear):
            m.bias.copy_(_nonzero(rng, m.out_features, 0.05, 0.3))


@torch.no_grad()
def _zero_filters(conv: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | None, idx: tuple[int, ...]) -> None:
    i = list(idx)
    conv.weight[i] = 0
    if conv.bias is not None:
        conv.bias[i] = 0
    if bn is not None:
        bn.weight[i] = 0
        bn.bias[i] = 0


@torch.no_grad()
def _zero_branch(block: Block) -> None:
    block.c2.conv.weight.zero_()
    block.c2.bn.weight.zero_()
    block.c2.bn.bias.zero_()


def net(head: str = "flatten", seed: int = 0) -> Net:
    torch.manual_seed(seed)
    m = Net(head).eval()
    _randomize(m, np.random.default_rng(seed))
    _zero_filters(m.block1.c1.conv, m.block1.c1.bn, NET_PLANTED[1])
    _zero_branch(m.block2)
    _zero_filters(m.down.conv, m.down.bn, NET_PLANTED[5])
    _zero_filters(m.conv, None, NET_PLANTED[8])
    return m


def twins(seed: int = 1) -> Twins:
    torch.manual_seed(seed)
    m = Twins().eval()
    _randomize(m, np.random.default_rng(seed))
    _zero_filters(m.a, None, TWINS_PLANTED[1])
    _zero_filters(m.b, None, TWINS_PLANTED[2])  # a and b: the same channels, so both biases stay equal
    _zero_branch(m.z1)
    _zero_branch(m.z2)
    return m


# ---------------------------------------------------------------- exporting


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def legacy(model: nn.Module, *, opset: int = 17, fold: bool = True, batch: int = 1, dynamic: tuple[int, ...] = (),
           keep_initializers_as_inputs: bool = False, dtype: torch.dtype = torch.float32, side: int = SIDE,
           outputs: tuple[str, ...] = ("output",)) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=False) on a `side` x `side` image; `dynamic` names the input dims exported as
    symbols (a dynamic batch is every output's too)."""
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0)).to(dtype)
    names = {0: "batch", 2: "height", 3: "width"}
    axes = ({"input": {d: names[d] for d in dynamic}, **{o: {0: "batch"} if 0 in dynamic else {} for o in outputs}}
            if dynamic else None)
    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(model.to(dtype), (x,), buf, dynamo=False, opset_version=opset, do_constant_folding=fold,
                          export_params=True, input_names=["input"], output_names=list(outputs), dynamic_axes=axes,
                          keep_initializers_as_inputs=keep_initializers_as_inputs)
    model.float()
    return onnx.load_from_string(buf.getvalue())


def dynamo(model: nn.Module, *, dynamic: tuple[int, ...] = (), side: int = SIDE,
           outputs: tuple[str, ...] = ("output",)) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=True) at its default opset on a `side` x `side` image; `dynamic` dims as
    torch.export Dims."""
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    dims = {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("height", min=8, max=64),
            3: torch.export.Dim("width", min=8, max=64)}
    shapes = {"x": {d: dims[d] for d in dynamic}} if dynamic else None
    with _quiet():
        prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"], output_names=list(outputs),
                                 dynamic_shapes=shapes, verbose=False)
    return prog.model_proto


# ---------------------------------------------------------------- the entries


def _net_entry(name: str, proto: onnx.ModelProto, head: str = "flatten", **kw) -> Entry:
    expect_in = {**NET_EXPECT_IN, 9: 6 * (SIDE // 2) ** 2 if head == "flatten" else 6}
    return Entry(name, proto, dict(NET_PLANTED), dict(NET_EXPECT), expect_in, NET_REMOVED, **kw)


def _twins_entry(name: str, proto: onnx.ModelProto, **kw) -> Entry:
    return Entry(name, proto, dict(TWINS_PLANTED), dict(TWINS_EXPECT), dict(TWINS_EXPECT_IN), TWINS_REMOVED, **kw)


def legacy_opset(opset: int, fold: bool) -> Entry:
    return _net_entry(f"legacy-opset{opset}-fold{int(fold)}", legacy(net(), opset=opset, fold=fold))


def dynamo_static() -> Entry:
    return _net_entry("dynamo", dynamo(net()))


def dynamo_dynamic_batch() -> Entry:
    return _net_entry("dynamo-dynamic-batch", dynamo(net(), dynamic=(0,)))


def legacy_dynamic_batch() -> Entry:
    return _net_entry("legacy-dynamic-batch", legacy(net(), dynamic=(0,)))


def _spatial_inputs() -> list[np.ndarray]:
    return [np.random.default_rng(3).standard_normal((2, 3, SIDE, SIDE)).astype(np.float32)]


def legacy_dynamic_spatial() -> Entry:
    return _net_entry("legacy-dynamic-spatial", legacy(net("gap"), dynamic=(0, 2, 3)), "gap",
                      dims={"height": SIDE, "width": SIDE}, compress_inputs=_spatial_inputs())


def dynamo_dynamic_spatial() -> Entry:
    proto = dynamo(net("gap"), dynamic=(0, 2, 3))
    return _net_entry("dynamo-dynamic-spatial", proto, "gap", dims={"height": SIDE, "width": SIDE},
                      compress_inputs=_spatial_inputs())


def initializers_as_inputs() -> Entry:
    return _net_entry("legacy-initializers-as-inputs", legacy(net(), fold=False, keep_initializers_as_inputs=True))


def external_data(tmp: Path) -> Entry:
    proto = legacy(net())
    path = tmp / "external.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.onnx.data", size_threshold=0)
    return _net_entry("legacy-external-data", onnx.load(str(path)), path=path)


# fp16: the compact model differs from the uncut one only in the order its sums run in, and the
# whole gap between this net in fp16 and in fp32 is 7.5e-4 of max |output| (ORT, 20 random feeds);
# 5e-3 leaves room for that, while dropping a live channel changes the output by ~1e-1.
FP16_RTOL = 5e-3


def fp16_half() -> Entry:
    return _net_entry("legacy-fp16-half", legacy(net(), dtype=torch.float16), rtol=FP16_RTOL)


def fp16_converted() -> Entry:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(legacy(net(), fold=False), keep_io_types=False)
    return _net_entry("fp16-converted", proto, rtol=FP16_RTOL)


def dedup_legacy(fold: bool) -> Entry:
    return _twins_entry(f"dedup-legacy-fold{int(fold)}", legacy(twins(), fold=fold))
