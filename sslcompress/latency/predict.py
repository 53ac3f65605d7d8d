"""Latency of a model from the table: the sum of its layers' ops at the widths a count keeps, calibrated.

Each layer costs its signature's table figure at its kept widths, interpolated bilinearly between grid
points (exact at them); below the smallest measured width the smallest one's figure stands (ORT pads
channels to its blocks of 8 or 16, so a narrower op is hardly faster), and a depthwise conv interpolates
along its one width. A layer the count removes costs 0, and a shrunk kernel (kernel_after) is not modelled:
the table is measured at the full kernel.

Calibration. The ops timed alone are not the model: activations, residual adds, pooling and ORT's layout
changes cost time between them, while ORT fuses a conv's bias and activation in the whole graph. `profile`
therefore times the whole dense model once and stores, per model, its total beside the sum of its layers'
full-width figures; their difference is the overhead. A prediction is the layers' sum plus that overhead
scaled by the layers' fraction of their dense sum:

    predicted = layers + overhead x layers / layers_dense  (= layers x total / layers_dense)

so the dense model is predicted exactly as measured, and the overhead shrinks with the layers, as the
activations and adds between them thin with their widths. A model the table has no whole-model figure for is
predicted by its layers alone.
"""

from __future__ import annotations

import bisect
import hashlib
import json

from ..errors import ConfigError
from ..finetune.counting import LayerCount, ModelCount
from ..finetune.structure import Layer, ModelStructure
from .signature import Signature, signatures_of
from .table import Entry, LatencyTable


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


def entry_latency(entry: Entry, in_width: float, out_width: float) -> float:
    """The entry's ms at these widths: bilinear between grid points (one axis for a depthwise conv)."""
    if not entry.points:
        raise ConfigError(f"the latency table has no figures for {entry.signature.ident()}")
    sig = entry.signature
    ins = entry.ins()
    if sig.depthwise:
        by_in = {i: ms for (i, _), ms in entry.points.items()}
        a, b, t = _bracket(ins, in_width)
        return (1 - t) * by_in[ins[a]] + t * by_in[ins[b]]
    outs = entry.outs()
    a, b, t = _bracket(ins, in_width)
    c, d, u = _bracket(outs, out_width)
    try:
        p = entry.points
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


def layer_latency(table: LatencyTable, layer: Layer, counted: LayerCount | None = None) -> float:
    """ms of every call of one layer at the widths `counted` keeps (full widths without it; 0 if removed)."""
    if counted is not None and counted.removed:
        return 0.0
    total = 0.0
    for sig in signatures_of(layer):
        if counted is None:
            cin, cout = sig.in_full, sig.out_full
        else:
            cin, cout = counted.channels[0], counted.filters[0]
        total += entry_latency(_entry(table, sig, layer.name), cin, cout)
    return total


def layers_latency(table: LatencyTable, structure: ModelStructure, count: ModelCount | None = None) -> float:
    """The sum of the layers' table figures, at the count's widths (full widths without a count)."""
    return sum(layer_latency(table, lay, count.layer(name) if count is not None else None)
               for name, lay in structure.layers.items())


def predict(table: LatencyTable, structure: ModelStructure, count: ModelCount | None = None) -> float:
    """Predicted ms of the model `count` describes (the dense model without one), calibrated as above."""
    layers = layers_latency(table, structure, count)
    timing = table.models.get(fingerprint(structure))
    if timing is None or timing.layers_ms <= 0:
        return layers
    return layers + timing.overhead_ms * layers / timing.layers_ms


def predict_dense(table: LatencyTable, structure: ModelStructure) -> float:
    """Predicted ms of the dense model: its measured total where profile timed it."""
    return predict(table, structure, None)
