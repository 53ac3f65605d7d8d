"""Latency of a model from the table: the sum of its layers' ops at the widths a count keeps, calibrated.

Each layer costs its signature's table figure at its kept widths, interpolated bilinearly between grid
points (exact at them), along the input axis among the measured widths of the same kind only (fewer than
one block of the CPU's 8 or 16 channels, which ORT reads in place at a higher cost per channel; those its
blocked convs take, whole blocks; or the others, which run slower; see signature.input_kind), along the
output axis at the width a blocked conv computes (padded to whole blocks); below the smallest measured width
of its kind the smallest one's figure stands (ORT pads channels to its blocks, so a narrower op is hardly
faster), and a depthwise conv interpolates along its one width. A layer the count removes costs 0, and a
shrunk kernel (kernel_after) is not modelled: the table is measured at the full kernel.

Calibration. The ops' figures are not the model. On the CPU they are the ops' compute times (kernel.py): the
whole model also pays the session call, pooling and the adds ORT does not fuse into a conv, and a layout
reorder wherever a conv ORT runs in its blocked layout (NCHWc, input widths in multiples of the CPU's block)
meets a plain one, which a compact model whose widths left the blocks does often and the dense model never.
`profile` therefore times the dense model and six narrowed variants whole, once, in the same rounds, stored
per model (table.py: the *off-block* variant, every free width one channel narrower, so its convs leave the
blocked layout; the *half* one; four random ones, two aligned to the block), the variants cut by the
surgery. With the layers' table sums split into blocked (B) and plain (P) ops, the seven totals are fitted
in three forms, a fixed cost c and a factor per kind, the factors alone, one factor
(ModelTiming.calibration), the form that predicts left-out models best taken; a prediction is

    predicted = c + a_blocked x B(widths kept) + a_plain x P(widths kept)

plus the layout reorders the kept widths need (layout.py), each at what the table measured for it: ORT's
ReorderInput and ReorderOutput around each op, and per conv output size a curve of ReorderOutputs of 1 to
block + 1 channels, since a part block is moved on a slower path (reorder_out_ms). The calibration fits each
whole model's time less its reorders.

A model the table has no whole-model figure for is predicted by its layers and reorders alone.
"""

from __future__ import annotations

import bisect
import hashlib
import json

from ..errors import ConfigError
from ..finetune.counting import LayerCount, ModelCount
from ..finetune.structure import Layer, ModelStructure
from .layout import reorders
from .signature import Signature, input_kind, padded, signatures_of
from .signature import blocked as runs_blocked
from .table import Entry, LatencyTable

MIN_SHARE = 0.1


def fingerprint(structure: ModelStructure) -> str:
    """The identity of a model's layers and their geometry: where its whole-model timing is filed."""
    layout = [[name, [s.ident() for s in signatures_of(lay)]] for name, lay in structure.layers.items()]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def _bracket(xs: list[int], v: float) -> tuple[int, int, float]:
    """Indices of the grid points around v and v's weight on the upper one; clamped to the grid's ends."""
    if v <= xs[0]:
        return 0, 0, 0.0
    if v >= xs[-1]:
        return len(xs) - 1, len(xs) - 1, 0.0
    hi = bisect.bisect_left(xs, v)
    if xs[hi] == v:
        return hi, hi, 0.0
    lo = hi - 1
    return lo, hi, (v - xs[lo]) / (xs[hi] - xs[lo])


def _same_kind(sig: Signature, ins: list[int], width: float, block: int) -> list[int]:
    """The measured input widths of the kind `width` is (read in place below one block, run in ORT's channel
    blocks, or plain; signature.input_kind), where the table has any of that kind. A plain conv's kind is its
    input width's, a depthwise conv's its channels' (times its multiplier); another grouped conv's widths are
    all of one kind here."""
    if not sig.blockable or (sig.groups > 1 and not sig.depthwise):
        return ins
    m = sig.multiplier

    def kind(w: float) -> str | bool:
        return input_kind(w, block) if sig.groups == 1 else runs_blocked(sig, int(w), int(w) * m, block)

    same = [i for i in ins if kind(i) == kind(width)]
    return same or ins


def entry_latency(entry: Entry, in_width: float, out_width: float, block: int = 1) -> float:
    """The entry's ms at these widths: bilinear between grid points (one axis for a depthwise conv). With the
    CPU's channel `block`, an input width is read among the measured ones of its kind (signature.input_kind)
    and a blocked conv's output width where ORT pads it, at whole blocks."""
    if not entry.points:
        raise ConfigError(f"the latency table has no figures for {entry.signature.ident()}")
    return _interpolated(entry, entry.points, in_width, out_width, block)


def entry_reorder(entry: Entry, side: str, in_width: float, out_width: float, block: int = 1) -> float:
    """ms of the ReorderInput (`side` "in") or ReorderOutput ("out") ORT put around the entry's op at these
    widths; 0 where the table holds none (a table of the CUDA provider). A reorder moves the tensor on its one
    side, so it is read along that width alone, at a measured width of the same kind: whole blocks, or a part
    block, which MLAS reorders on a slower path (12 channels of 32x32 at batch 8 took 62 us to the 25 us of
    16 on an AVX-512 EPYC)."""
    if not entry.reorders or set(entry.reorders) != set(entry.points):
        return 0.0
    sig = entry.signature
    at, width = (0, in_width) if side == "in" else (1, out_width)
    if sig.depthwise:
        line = {i: entry.reorders[(i, o)][at] for i, o in entry.points}
        width = in_width
    elif side == "in":
        column = entry.outs()[-1]
        line = {i: entry.reorders[(i, column)][at] for i in entry.ins()}
    else:
        # any input width the op ran blocked at: the ReorderOutput is there only then
        rows = [i for i in entry.ins() if runs_blocked(sig, i, sig.out_full, block)]
        if not rows:
            return 0.0
        line = {o: entry.reorders[(rows[-1], o)][at] for o in entry.outs()}

    def whole(w: float) -> bool:
        return block <= 1 or w % block == 0

    xs = sorted(w for w in line if whole(w) == whole(width) and line[w] > 0) or sorted(line)
    a, b, t = _bracket(xs, width)
    return (1 - t) * line[xs[a]] + t * line[xs[b]]


def _interpolated(entry: Entry, values: dict[tuple[int, int], float], in_width: float, out_width: float,
                  block: int) -> float:
    sig = entry.signature
    if runs_blocked(sig, int(in_width), int(out_width), block) and not sig.depthwise:
        out_width = min(padded(int(out_width), block), sig.out_full)
        if sig.groups == 1 and in_width >= block:  # ORT pads a blocked input to whole blocks (block.py)
            in_width = min(padded(int(in_width), block), sig.in_full)
    ins = _same_kind(sig, entry.ins(), in_width, block)
    if sig.depthwise:
        by_in = {i: ms for (i, _), ms in values.items()}
        a, b, t = _bracket(ins, in_width)
        return (1 - t) * by_in[ins[a]] + t * by_in[ins[b]]
    outs = entry.outs()
    a, b, t = _bracket(ins, in_width)
    c, d, u = _bracket(outs, out_width)
    try:
        p = values
        low = (1 - u) * p[(ins[a], outs[c])] + u * p[(ins[a], outs[d])]
        high = (1 - u) * p[(ins[b], outs[c])] + u * p[(ins[b], outs[d])]
    except KeyError as exc:
        raise ConfigError(f"the latency table's grid for {sig.ident()} lacks the point {exc.args[0]}") from exc
    return (1 - t) * low + t * high


def _entry(table: LatencyTable, sig: Signature, layer: str) -> Entry:
    entry = table.entries.get(sig.ident())
    if entry is None or not entry.points:
        raise ConfigError(f"the latency table has no figures for layer {layer} ({sig.ident()}); profile this "
                          "model first")
    return entry


def parts_at(table: LatencyTable, layer: Layer, widths: tuple[int, int] | None = None) -> tuple[float, float]:
    """(blocked, plain) ms of every call of one layer at (input, output) `widths` (its full widths without
    them): its table figure, filed under the kind of op ORT makes of it."""
    blocked = plain = 0.0
    for sig in signatures_of(layer):
        cin, cout = widths if widths is not None else (sig.in_full, sig.out_full)
        ms = entry_latency(_entry(table, sig, layer.name), cin, cout, table.key.block)
        if runs_blocked(sig, cin, cout, table.key.block):
            blocked += ms
        else:
            plain += ms
    return blocked, plain


def layer_parts(table: LatencyTable, layer: Layer, counted: LayerCount | None = None) -> tuple[float, float]:
    """(blocked, plain) ms of every call of one layer at the widths `counted` keeps (full widths without it;
    0 if removed)."""
    if counted is None:
        return parts_at(table, layer)
    if counted.removed:
        return 0.0, 0.0
    return parts_at(table, layer, (counted.channels[0], counted.filters[0]))


def layer_latency(table: LatencyTable, layer: Layer, counted: LayerCount | None = None) -> float:
    """ms of every call of one layer at the widths `counted` keeps (full widths without it; 0 if removed)."""
    return sum(layer_parts(table, layer, counted))


def layers_parts(table: LatencyTable, structure: ModelStructure, count: ModelCount | None = None
                 ) -> tuple[float, float]:
    """The layers' (blocked, plain) table sums at the count's widths (full widths without a count)."""
    parts = [layer_parts(table, lay, count.layer(name) if count is not None else None)
             for name, lay in structure.layers.items()]
    return sum(b for b, _ in parts), sum(p for _, p in parts)


def layers_latency(table: LatencyTable, structure: ModelStructure, count: ModelCount | None = None) -> float:
    """The sum of the layers' table figures, at the count's widths (full widths without a count)."""
    return sum(layers_parts(table, structure, count))


def kept_widths(structure: ModelStructure, count: ModelCount | None = None) -> dict[str, tuple[int, int]]:
    """Each live layer's kept (input, output) widths (full widths without a count); deleted layers left out."""
    widths = {}
    for name, lay in structure.layers.items():
        counted = count.layer(name) if count is not None else None
        if counted is None:
            sig = signatures_of(lay)[0]
            widths[name] = (sig.in_full, sig.out_full)
        elif not counted.removed:
            widths[name] = (counted.channels[0], counted.filters[0])
    return widths


def curve_key(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def reorder_out_ms(table: LatencyTable, layer: Layer, widths: tuple[int, int]) -> float:
    """ms of the ReorderOutput after a blocked conv writing `widths[1]` channels. MLAS moves whole blocks on
    one path and the channels of a last part block on a slower one, and the slow part grows with the channels
    in it, not with the block's width: at 32x32 and batch 8 on an AVX-512 EPYC, 16 channels took 34 us, 12 took
    63, 25 took 68, 41 took 83. So the whole blocks are read from the conv's own points (entry_reorder, at the
    last whole block), and the part block from the table's reorder curve of the conv's output size, less what
    a reorder costs at all (curve: 1 + block - (block + 1) channels); without a curve, the conv's points
    alone."""
    sig = signatures_of(layer)[0]
    entry = _entry(table, sig, layer.name)
    block = table.key.block
    cin, cout = widths
    curve = table.reorder_curves.get(curve_key(layer.out_hw))
    part = cout % block if block > 1 else 0
    if not curve or not part or any(w not in curve for w in (1, block, block + 1)):
        return entry_reorder(entry, "out", cin, cout, block)
    whole = cout - part
    if whole == 0:
        return curve[part]
    fixed = max(curve[1] + curve[block] - curve[block + 1], 0.0)
    return entry_reorder(entry, "out", cin, whole, block) + max(curve[part] - fixed, 0.0)


def reorders_ms(table: LatencyTable, structure: ModelStructure, count: ModelCount | None = None) -> float:
    """ms of the layout reorders the model needs at the count's widths (layout.py), each at the figure the
    table holds for it beside the op it sits at."""
    widths = kept_widths(structure, count)
    total = 0.0
    for r in reorders(structure, widths, table.key.block):
        layer = structure.layers[r.layer]
        if r.side == "out":
            total += reorder_out_ms(table, layer, widths[r.layer])
        else:
            sig = signatures_of(layer)[0]
            total += entry_reorder(_entry(table, sig, r.layer), "in", *widths[r.layer], table.key.block)
    return total


def predict(table: LatencyTable, structure: ModelStructure, count: ModelCount | None = None) -> float:
    """Predicted ms of the model `count` describes (the dense model without one), calibrated as above."""
    blocked, plain = layers_parts(table, structure, count)
    reordered = reorders_ms(table, structure, count)
    timing = table.models.get(fingerprint(structure))
    if timing is None:
        return blocked + plain + reordered
    constant, a_blocked, a_plain = timing.calibration()
    scaled = a_blocked * blocked + a_plain * plain
    # A negative constant stands for what the ops' figures hold that the whole model does not pay
    # (ModelTiming.calibration); a model narrower than every calibration run could fall below it: never
    # predict less than a tenth of the scaled ops.
    return max(constant + scaled, MIN_SHARE * scaled) + reordered


def predict_dense(table: LatencyTable, structure: ModelStructure) -> float:
    """Predicted ms of the dense model: the calibrated sum at full widths (the calibration's fit runs through
    the whole-model timings of the profile, the dense model's among them, not exactly through it)."""
    return predict(table, structure, None)
