"""A convolution lowered to one GEMM (im2col), and sparsity imposed on a lowered weight.

Part of the per-layer study (see `sslcompress.bench.layers`). Imports only the standard library, numpy
and torch, so `benchmarks/paper_table4.py` runs with torch and numpy alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sslcompress.errors import ConfigError


# ---------------------------------------------------------------- lowering a conv to a GEMM
def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int | np.integer):
        return int(v), int(v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ConfigError(f"expected an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def _pads(pad: Any) -> tuple[int, int, int, int]:
    """int, (ph, pw) or ONNX-ordered (top, left, bottom, right)."""
    if isinstance(pad, int | np.integer):
        return (int(pad),) * 4  # type: ignore[return-value]
    t = tuple(int(x) for x in pad)
    if len(t) == 2:
        return t[0], t[1], t[0], t[1]
    if len(t) == 4:
        return t  # type: ignore[return-value]
    raise ConfigError(f"pads must be an int, a pair or (top, left, bottom, right), got {pad!r}")


@dataclass(frozen=True)
class ConvShape:
    """A 2-D convolution's geometry: all that sizes its lowered GEMM."""

    name: str
    out_channels: int
    in_channels: int  # all of them, not per group
    kernel: tuple[int, int]
    input_hw: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, name: str, out_channels: int, in_channels: int, kernel: Any, input_hw: Any,
           stride: Any = 1, pad: Any = 0, dilation: Any = 1, groups: int = 1) -> ConvShape:
        if groups < 1 or out_channels % groups or in_channels % groups:
            raise ConfigError(f"{name}: {out_channels} and {in_channels} channels do not split into {groups} groups")
        return cls(name, int(out_channels), int(in_channels), _pair(kernel), _pair(input_hw),
                   _pair(stride), _pads(pad), _pair(dilation), int(groups))

    @property
    def output_hw(self) -> tuple[int, int]:
        t, left, b, r = self.pads
        ho = (self.input_hw[0] + t + b - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        wo = (self.input_hw[1] + left + r - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        if ho < 1 or wo < 1:
            raise ConfigError(f"{self.name}: the kernel does not fit the {self.input_hw} input")
        return ho, wo

    def gemm_dims(self, batch: int = 1) -> tuple[int, int, int]:
        """(M, K, N) of one group's GEMM; a grouped conv runs `groups` of them."""
        ho, wo = self.output_hw
        m = self.out_channels // self.groups
        k = self.in_channels // self.groups * self.kernel[0] * self.kernel[1]
        return m, k, ho * wo * batch


def im2col(x: torch.Tensor, kernel: Any, stride: Any = 1, pad: Any = 0, dilation: Any = 1) -> torch.Tensor:
    """(B, C, H, W) -> (C*kh*kw, B*Ho*Wo), rows in the weight's (c, i, j) order, columns image by image."""
    t, left, b, r = _pads(pad)
    if t or left or b or r:
        x = F.pad(x, (left, r, t, b))
    cols = F.unfold(x, _pair(kernel), dilation=_pair(dilation), stride=_pair(stride))  # (B, K, L)
    return cols.permute(1, 0, 2).reshape(cols.shape[1], -1)


def conv_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
                 pad: Any = 0, dilation: Any = 1, groups: int = 1) -> torch.Tensor:
    """conv2d computed as the lowered GEMMs the study times (one per group)."""
    b, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    shape = ConvShape.of("conv", o, c, (kh, kw), (h, w), stride, pad, dilation, groups)
    ho, wo = shape.output_hw
    og = o // groups
    outs = [weight[g * og:(g + 1) * og].reshape(og, -1)
            @ im2col(x[:, g * cg:(g + 1) * cg], (kh, kw), stride, pad, dilation) for g in range(groups)]
    y = torch.cat(outs, 0)
    if bias is not None:
        y = y + bias[:, None]
    return y.reshape(o, b, ho, wo).permute(1, 0, 2, 3)


@dataclass(frozen=True)
class LayerGemm:
    """One lowered GEMM to time: weight (M x K, float32, zeros as the layer has them) times X (K x N)."""

    name: str
    M: int
    K: int
    N: int
    weight: np.ndarray = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        w = np.ascontiguousarray(self.weight, dtype=np.float32)
        if w.shape != (self.M, self.K) or self.N < 1:
            raise ConfigError(f"{self.name}: weight {w.shape} does not match M x K = {self.M} x {self.K}, N = {self.N}")
        object.__setattr__(self, "weight", w)

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.weight))

    @property
    def kept_rows(self) -> np.ndarray:
        return np.flatnonzero(self.weight.any(axis=1))

    @property
    def kept_cols(self) -> np.ndarray:
        return np.flatnonzero(self.weight.any(axis=0))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.weight.size


@dataclass(frozen=True)
class ConvSpec:
    """A real conv to study: weight (O, C/groups, kh, kw) and the input size it sees."""

    name: str
    weight: np.ndarray = field(repr=False, compare=False)
    input_hw: Any = 1
    stride: Any = 1
    pad: Any = 0
    dilation: Any = 1
    groups: int = 1

    def shape(self) -> ConvShape:
        o, cg, kh, kw = np.shape(self.weight)
        return ConvShape.of(self.name, o, cg * self.groups, (kh, kw), self.input_hw, self.stride, self.pad,
                            self.dilation, self.groups)


def lower_convs(convs: Iterable[ConvSpec | Sequence[Any]], batch: int = 1) -> list[LayerGemm]:
    """Layer GEMMs from (name, weight, input_hw, stride, pad[, dilation, groups]) items.

    A grouped conv gives one GEMM per group, named `name[gI]` (a depthwise conv gives many tiny ones).
    """
    out: list[LayerGemm] = []
    for item in convs:
        spec = item if isinstance(item, ConvSpec) else ConvSpec(*item)
        w = np.asarray(spec.weight, dtype=np.float32)
        if w.ndim != 4:
            raise ConfigError(f"{spec.name}: a conv weight has 4 axes, got shape {w.shape}")
        shape = spec.shape()
        m, k, n = shape.gemm_dims(batch)
        for g in range(shape.groups):
            name = spec.name if shape.groups == 1 else f"{spec.name}[g{g}]"
            out.append(LayerGemm(name, m, k, n, w[g * m:(g + 1) * m].reshape(m, k)))
    return out


# ---------------------------------------------------------------- imposing sparsity
def _count(fraction: float, n: int) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"a sparsity is a fraction in [0, 1], got {fraction}")
    return min(n, math.floor(fraction * n + 0.5))


def magnitude_prune(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Copy with exactly round(sparsity * size) smallest-magnitude entries zeroed (ties by position)."""
    w = np.array(weight, dtype=np.float32, copy=True, order="C")
    n_zero = _count(sparsity, w.size)
    if n_zero:
        w.reshape(-1)[np.argsort(np.abs(w), axis=None, kind="stable")[:n_zero]] = 0.0
    return w


def structured_prune(weight: np.ndarray, row_sparsity: float, col_sparsity: float) -> np.ndarray:
    """Copy of a lowered (M x K) weight with its weakest rows, then its weakest columns, zeroed (L2 norm).

    Exactly round(r*M) zero rows and round(c*K) zero columns when the input has none and not every row goes.
    """
    w = np.array(weight, dtype=np.float32, copy=True, order="C")
    m, k = w.shape
    w[np.argsort(np.sqrt((w * w).sum(axis=1)), kind="stable")[:_count(row_sparsity, m)]] = 0.0
    w[:, np.argsort(np.sqrt((w * w).sum(axis=0)), kind="stable")[:_count(col_sparsity, k)]] = 0.0
    return w


def random_weight(m: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal((m, k)) / math.sqrt(k)).astype(np.float32)
