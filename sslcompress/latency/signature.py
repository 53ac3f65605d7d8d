"""What fixes a layer's speed apart from its widths (its signature), and the widths a table measures.

Two layers with one signature (ResNet's repeated 3x3 convs of one stage) share their table entry. A
depthwise conv (groups == input channels) has one width: each kept channel keeps its filters, so its input
and output widths move together (out = width x channel multiplier).

A conv's speed is not smooth in its input width: ORT runs a conv in its blocked layout (NCHWc) only where the
input channels fill whole blocks (or are fewer than one block), and falls back to a plain conv, up to twice as
slow, where they do not. The block is ORT's on this CPU (block.py: 8 with AVX2, 16 with AVX-512F; on an AVX2
EPYC of this project a 3x3 conv of 64 -> 64 channels on 8x8 took 0.051 ms, of 63 -> 63 0.079 ms, of 56 -> 56
0.051 ms). Interpolating between widths that are multiples of the block would miss that, so a conv's input
axis is measured twice: at the grid's widths and one below each multiple of the block ("off-block" widths),
and a width is interpolated among the measured widths of its own kind (see predict.py). Output widths are
padded up to a block by ORT: a blocked conv is read at its output width rounded up to one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError
from ..finetune.structure import Layer

# ORT's CPU convs work on blocks of 8 channels (AVX2) or 16 (AVX-512F); the table's key holds this CPU's
# (block.py). This one is the default of a key built by hand.
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
    # 1 for a Conv1d: its geometry is a conv's of one row (kernel 1 x K, input 1 x L), measured as a Conv1d,
    # which ORT runs without its blocked 2-D layout.
    dims: int = 2

    @property
    def blockable(self) -> bool:
        """A 2-D conv: what ORT's NCHWc transformer may take into its blocked layout (it leaves 1-D ones)."""
        return self.kind == "conv" and self.dims == 2

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
        if self.dims == 1:
            return (f"conv1d o{self.out_full} i{self.in_full} k{self.kernel[1]} s{self.stride[1]} "
                    f"p{self.padding[1]} d{self.dilation[1]} g{self.groups} l{self.in_hw[1]}")
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
    kernel = layer.kernel
    in_full = w[1] * layer.groups
    dims = 1 if layer.one_dimensional else 2
    sigs = [Signature("conv", w[0], in_full, kernel, layer.stride, layer.padding, layer.dilation, layer.groups,
                      layer.in_hw, dims=dims)]
    for out_hw in layer.more_hw:
        in_hw = tuple(_input_size(o, s, p, d, k) for o, s, p, d, k in
                      zip(out_hw, layer.stride, layer.padding, layer.dilation, kernel))
        sigs.append(Signature("conv", w[0], in_full, kernel, layer.stride, layer.padding, layer.dilation,
                              layer.groups, in_hw, dims=dims))
    return sigs


def default_step(full: int, block: int = CHANNEL_BLOCK) -> int:
    """About GRID_POINTS widths up to `full`: full // 16, rounded to a multiple of 8 where the width holds two
    blocks of 8 (so the grid shows ORT's channel blocking, and 16m + 8 widths show a block of 16), else 1."""
    step = max(1, full // GRID_POINTS)
    grain = min(8, block) if block > 1 else 1
    if grain > 1 and full >= 2 * grain:
        step = max(grain, grain * round(step / grain))
    return step


def on_block(width: float, block: int = CHANNEL_BLOCK, align: int | None = None) -> bool:
    """Whether ORT takes a plain conv of this input width in its blocked layout: fewer channels than one block
    (read in place), or a multiple of `align` (ORT pads it to whole blocks; block.nchwc_input_alignment, this
    onnxruntime's step, by default: 4 in 1.32, the block in older ones). Every width where there are no
    blocks (block 1)."""
    if block <= 1:
        return True
    if align is None:
        from .block import nchwc_input_alignment

        align = nchwc_input_alignment()
    align = min(align, block)
    return width < block or width % align == 0


def input_kind(width: float, block: int = CHANNEL_BLOCK, align: int | None = None) -> str:
    """How ORT's CPU convs read a plain conv's input of this width, three kinds whose costs lie on different
    lines: "narrow", fewer channels than one block, read in place (no reorder) by a kernel that costs more per
    channel than the blocked one (at 32x32 and batch 8 on an AVX-512 EPYC, 15 channels took 0.45 ms where 16
    took 0.39 and 8 took 0.24); "blocked", whole blocks or a multiple of the input alignment (on_block);
    "plain", the rest. Every width is "blocked" where there are no blocks (block 1)."""
    if block > 1 and width < block:
        return "narrow"
    return "blocked" if on_block(width, block, align) else "plain"


def below_block(widths: list[int], block: int = CHANNEL_BLOCK) -> list[int]:
    """The widest narrow input width (block - 1) where `widths` reach a whole block and lack it: a narrow
    input costs more per channel than a blocked one, so below the block a grid of multiples of 8 alone read
    12 channels at half way between 8 and 16 where they cost what 16 do (input_kind)."""
    if block <= 2 or not widths or max(widths) < block or block - 1 in widths:
        return []
    return [block - 1]


def off_block(widths: list[int], block: int = CHANNEL_BLOCK) -> list[int]:
    """One below each multiple of the block among `widths`, where that leaves ORT's blocked convs, and the
    narrowest width that does (one above a block) where `widths` reach two blocks: a plain conv is not padded,
    so between one block and two it gets cheaper down to block + 1, and a width there read at 2 x block - 1
    (the narrowest plain width measured otherwise) was charged up to two thirds more channels than it has."""
    if block <= 1:
        return []
    below = {w - 1 for w in widths if w % block == 0 and not on_block(w - 1, block)}
    narrowest = {block + 1} if any(w >= 2 * block for w in widths) else set()
    return sorted((below | narrowest) - set(widths))


def padded(width: int, block: int = CHANNEL_BLOCK) -> int:
    """The output width a blocked conv computes: rounded up to whole blocks."""
    return width if block <= 1 else block * math.ceil(width / block)


def blocked(sig: Signature, in_width: int, out_width: int, block: int = CHANNEL_BLOCK) -> bool:
    """Whether ORT runs this conv call in its blocked layout at these widths (its NCHWc transformer's rule:
    a plain conv by its input width; a depthwise one when its channels fill blocks; another grouped conv
    when its channels per group and its outputs per group fill blocks)."""
    if not sig.blockable or block <= 1:
        return False
    if sig.groups == 1:
        return on_block(in_width, block)
    if sig.depthwise:
        return out_width % block == 0
    return (out_width % block == 0 and (in_width // sig.groups) % block == 0
            and (out_width // sig.groups) % block == 0)


def width_grid(full: int, step: int | None = None, multiple: int = 1, block: int = CHANNEL_BLOCK) -> list[int]:
    """Every multiple of `step` up to `full`, and `full`. A grouped conv's widths must be multiples of its
    groups, so the step is rounded up to one (`multiple`)."""
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise ConfigError(f"the width step must be a positive integer, got {step!r}")
    step = default_step(full, block) if step is None else step
    step = multiple * math.ceil(step / multiple)
    return sorted({*range(step, full + 1, step), full})
