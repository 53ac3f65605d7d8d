"""What fixes a layer's speed apart from its widths (its signature), and the widths a table measures.

Two layers with one signature (ResNet's repeated 3x3 convs of one stage) share their table entry. A
depthwise conv (groups == input channels) has one width: each kept channel keeps its filters, so its input
and output widths move together (out = width x channel multiplier).

A conv's speed is not smooth in its input width: ORT runs a conv in its blocked layout (NCHWc) only where the
input channels fill whole blocks of 8, and falls back to a plain conv, up to twice as slow, where they do not
(measured on this project's AMD EPYC with AVX-512, where the boundary is 8, not 16: a 3x3 conv of 64 -> 64 channels on 8x8 took 0.051 ms, of 63 -> 63 0.079 ms, of 56
-> 56 0.051 ms). Interpolating between widths that are multiples of 8 would miss that, so a conv's input axis
is measured twice: at the grid's widths and one below each multiple of 8 ("off-block" widths), and a width is
interpolated among the measured widths of its own kind (see predict.py). Output widths are padded to a block
by ORT and need no such care.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError
from ..finetune.structure import Layer

# ORT's CPU convs work on blocks of 8 channels (AVX2) or 16 (AVX-512): grid steps that are multiples of 8
# show where a width crosses a block.
CHANNEL_BLOCK = 8
GRID_POINTS = 16  # a default grid of about this many widths per axis


@dataclass(frozen=True)
class Signature:
    kind: str  # "conv" | "linear"
    out_full: int
    in_full: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)
    rows: int = 1  # rows per sample of a Linear (tokens); 1 for a Linear on (batch, features)

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_full

    @property
    def multiplier(self) -> int:
        """Outputs per input channel of a depthwise conv."""
        return self.out_full // self.groups if self.depthwise else 1

    def ident(self) -> str:
        """The signature as one short string, the table's key for its entry."""
        if self.kind == "linear":
            return f"linear o{self.out_full} i{self.in_full} r{self.rows}"
        return (f"conv o{self.out_full} i{self.in_full} k{_xy(self.kernel)} s{_xy(self.stride)} "
                f"p{_xy(self.padding)} d{_xy(self.dilation)} g{self.groups} hw{_xy(self.in_hw)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Signature:
        pairs = ("kernel", "stride", "padding", "dilation", "in_hw")
        return cls(**{k: (tuple(int(x) for x in v) if k in pairs else v) for k, v in d.items()})


def _xy(pair: tuple[int, int]) -> str:
    return f"{pair[0]}x{pair[1]}"


def _input_size(out: int, stride: int, pad: int, dilation: int, kernel: int) -> int:
    """The smallest input side a conv maps to an `out` side (for a further call, whose input was not kept)."""
    return max(1, (out - 1) * stride - 2 * pad + dilation * (kernel - 1) + 1)


def signatures_of(layer: Layer) -> list[Signature]:
    """One signature per call of the layer (a module called twice costs two ops)."""
    w = layer.weight_shape
    if layer.kind == "linear":
        return [Signature("linear", w[0], w[1], rows=hw[0]) for hw in [layer.out_hw, *layer.more_hw]]
    kernel = (w[2], w[3])
    in_full = w[1] * layer.groups
    sigs = [Signature("conv", w[0], in_full, kernel, layer.stride, layer.padding, layer.dilation, layer.groups,
                      layer.in_hw)]
    for out_hw in layer.more_hw:
        in_hw = tuple(_input_size(o, s, p, d, k) for o, s, p, d, k in
                      zip(out_hw, layer.stride, layer.padding, layer.dilation, kernel))
        sigs.append(Signature("conv", w[0], in_full, kernel, layer.stride, layer.padding, layer.dilation,
                              layer.groups, in_hw))
    return sigs


def default_step(full: int) -> int:
    """About GRID_POINTS widths up to `full`: full // 16, rounded to a multiple of 8 where the width holds two
    blocks of 8 (so the grid shows ORT's channel blocking), else 1."""
    step = max(1, full // GRID_POINTS)
    if full >= 2 * CHANNEL_BLOCK:
        step = max(CHANNEL_BLOCK, CHANNEL_BLOCK * round(step / CHANNEL_BLOCK))
    return step


def on_block(width: float) -> bool:
    """Whether a width fills whole channel blocks (the kind of width it is interpolated among)."""
    return width % CHANNEL_BLOCK == 0


def off_block(widths: list[int]) -> list[int]:
    """One below each multiple of the block among `widths`: the input widths that leave ORT's blocked convs."""
    return sorted({w - 1 for w in widths if w > 1 and on_block(w)} - set(widths))


def width_grid(full: int, step: int | None = None, multiple: int = 1) -> list[int]:
    """Every multiple of `step` up to `full`, and `full`. A grouped conv's widths must be multiples of its
    groups, so the step is rounded up to one (`multiple`)."""
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise ConfigError(f"the width step must be a positive integer, got {step!r}")
    step = default_step(full) if step is None else step
    step = multiple * math.ceil(step / multiple)
    return sorted({*range(step, full + 1, step), full})
