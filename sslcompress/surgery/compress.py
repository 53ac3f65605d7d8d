"""Surgery of a whole ONNX model: passes, then verification against the uncut model, then a report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .depth import remove_zero_branches
from .export import load_onnx
from .kernels import shrink_kernels
from .measure import layers, parameters
from .prune import fold_constant_channels, prune_dead_channels
from .verify import VerifyResult, compare


@dataclass(frozen=True)
class CompressResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    verification: VerifyResult


def compress(model: onnx.ModelProto | str | Path, *, inputs: list[np.ndarray] | None = None,
             rtol_of_max: float = 1e-4) -> CompressResult:
    """The compact model and its report; `verification.passed` says whether it may be written."""
    t0 = time.perf_counter()
    proto = load_onnx(model) if isinstance(model, (str, Path)) else model
    # Branches first: a zero branch's inner tensors are wholly dead, which channel pruning leaves be.
    depth = remove_zero_branches(proto)
    folded, n_folded = fold_constant_channels(depth.model)
    pruned = prune_dead_channels(folded)
    shrunk = shrink_kernels(pruned.model)
    t_surgery = time.perf_counter() - t0
    check = compare(proto, shrunk.model, inputs, rtol_of_max=rtol_of_max)
    report = build_report(proto, shrunk.model, check, channels_removed=pruned.channels_removed,
                          seconds={"surgery": t_surgery, "total": time.perf_counter() - t0})
    report["blocks_removed"] = list(depth.branches_removed)
    report["constant_channels_folded"] = n_folded
    report["kernels_shrunk"] = {k: [list(a), list(b)] for k, (a, b) in shrunk.shrunk.items()}
    return CompressResult(shrunk.model, report, check)


def build_report(before: onnx.ModelProto, after: onnx.ModelProto, check: VerifyResult, *,
                 channels_removed: int, seconds: dict[str, float]) -> dict[str, Any]:
    la = {lay.name: lay for lay in layers(after)}
    rows = []
    for lb in layers(before):
        a = la.get(lb.name)
        rows.append({"name": lb.name, "op": lb.op, "weight": list(lb.weight_shape),
                     "weight_after": list(a.weight_shape) if a else None,
                     "macs": lb.macs, "macs_after": a.macs if a else 0})
    macs = sum(r["macs"] for r in rows)
    macs_after = sum(r["macs_after"] for r in rows)
    return {
        "layers": rows,
        "totals": {
            "macs": macs, "macs_after": macs_after, "macs_fraction": macs_after / macs if macs else 1.0,
            "params": parameters(before), "params_after": parameters(after),
            "nodes": len(before.graph.node), "nodes_after": len(after.graph.node),
            "bytes": before.ByteSize(), "bytes_after": after.ByteSize(),
            "channels_removed": channels_removed,
        },
        "verification": {"max_abs": check.max_abs, "max_ref": check.max_ref, "rel": check.rel,
                         "top1_agreement": check.top1_agreement, "passed": check.passed,
                         "inputs": check.n_inputs},
        "seconds": seconds,
    }
