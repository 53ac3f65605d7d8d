"""The run report: plain data (JSON and checkpoint friendly); the CLI renders it as tables.

A finetune run with a budget adds `budget`: per metric (macs, params) the fraction asked (None when
not asked) and reached; with --align, `widths` lists every width kept (the layers that write one
channel set, kept/total, whether it is a multiple of the alignment, or why alignment leaves it).
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any

from ..models import ModelSpec
from .counting import ModelCount
from .regularizer import GroupLasso


def _layer_row(lay) -> dict[str, Any]:
    return {
        "name": lay.name, "kind": lay.kind,
        "filters": list(lay.filters), "channels": list(lay.channels), "columns": list(lay.columns),
        "kernel": list(lay.kernel), "kernel_after": list(lay.kernel_after),
        "macs": lay.macs, "macs_after": lay.macs_after, "macs_gemm_after": lay.macs_gemm_after,
        "params": lay.params, "params_after": lay.params_after, "removed": lay.removed,
    }


def group_summary(lasso: GroupLasso | None, all_groups) -> dict[str, Any]:
    """Per kind: how many groups, how many removable, how many exactly zero; why others are not."""
    kinds: dict[str, dict[str, int]] = {}
    for g in all_groups:
        row = kinds.setdefault(g.kind, {"total": 0, "removable": 0, "zero": 0})
        row["total"] += 1
        row["removable"] += int(g.removable)
    if lasso is not None:
        for kind, zero in lasso.zero_groups().items():
            kinds[kind]["zero"] = int(zero.sum())
    blocked = Tally(g.reason for g in all_groups if not g.removable)
    return {"kinds": kinds, "not_removable": dict(blocked)}


def unit_summary(counted: ModelCount, all_groups) -> dict[str, list[dict[str, Any]]]:
    """Transformer units kept: heads per attention, and hidden neurons per layer that writes neuron groups
    (an MLP's first Linear), each as kept of total; empty lists for a model without them."""
    writers = {s.param.rsplit(".", 1)[0] for g in all_groups if g.kind == "neuron"
               for s in g.slices if s.axis == "out" and s.param.endswith(".weight")}
    neurons = [{"layer": lay.name, "kept": lay.filters[0], "total": lay.filters[1]}
               for lay in counted.layers if lay.name in writers]
    heads = [{"attention": name, "kept": kept, "total": total} for name, kept, total in counted.heads]
    return {"heads": heads, "neurons": neurons}


def build_report(spec: ModelSpec, data: str, counted: ModelCount, accuracy: dict[str, float | None], *,
                 method: str, groups: GroupLasso | None, extra: dict[str, Any] | None = None,
                 all_groups=None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "model": spec.name,
        "data": data,
        "method": method,
        "input_shape": list(spec.input_shape),
        "layers": [_layer_row(lay) for lay in counted.layers],
        "blocks_removed": list(counted.blocks_removed),
        "blocks_total": counted.blocks_total,
        "totals": {
            "macs": counted.macs, "macs_after": counted.macs_after, "macs_gemm_after": counted.macs_gemm_after,
            "macs_fraction": counted.macs_fraction, "macs_gemm_fraction": counted.macs_gemm_fraction,
            "params": counted.params, "params_after": counted.params_after,
            "params_fraction": counted.params_after / counted.params if counted.params else 1.0,
            "dead_channels": counted.dead_channels,
        },
        "accuracy": accuracy,
    }
    if groups is not None:
        every = all_groups if all_groups is not None else groups.all_groups
        report["groups"] = group_summary(groups, every)
        report["units"] = unit_summary(counted, every)
    if extra:
        report.update(extra)
    return report
