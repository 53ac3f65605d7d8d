"""Surgery of a whole ONNX model: passes, then verification against the uncut model, then a report."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import SurgeryError
from .depth import remove_zero_branches
from .diverge import Divergence, first_diverging_node
from .export import load_onnx
from .features import select_features
from .fold import fold_constant_channels
from .inputs import random_batches
from .kernels import shrink_kernels
from .lowering import lower_sparse_columns
from .measure import layers, parameters
from .prune import prune_dead_channels
from .verify import VerifyResult, compare


@dataclass(frozen=True)
class CompressResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    verification: VerifyResult


def compress(model: onnx.ModelProto | str | Path, *, inputs: list[np.ndarray] | None = None,
             rtol_of_max: float = 1e-4, shape_lowering: str = "auto") -> CompressResult:
    """The compact model and its report; `verification.passed` says whether it may be written."""
    t0 = time.perf_counter()
    proto = load_onnx(model) if isinstance(model, (str, Path)) else model
    # Branches first: a zero branch's inner tensors are wholly dead, which channel pruning leaves be.
    depth = remove_zero_branches(_with_shapes(proto))
    fold = fold_constant_channels(depth.model)
    pruned = prune_dead_channels(fold.model)
    features = select_features(pruned.model)
    shrunk = shrink_kernels(features.model)
    # Last: it times the convs as they will run.
    lowered = lower_sparse_columns(shrunk.model, shape_lowering)
    compact = finish(lowered.model)
    t_surgery = time.perf_counter() - t0
    # Random batches (of the real inputs' shape where the model's is dynamic), then the real ones.
    real_batches = list(inputs or [])
    random = random_batches(proto, real_batches)
    check = compare(proto, compact, random + real_batches, n_random=0, rtol_of_max=rtol_of_max)
    real = compare(proto, compact, real_batches, n_random=0, rtol_of_max=rtol_of_max) if real_batches else None
    diverging = None if check.passed else first_diverging_node(
        proto, compact, random[:2] + real_batches[:2], rtol_of_max=rtol_of_max)
    report = build_report(proto, compact, check, channels_removed=pruned.channels_removed,
                          seconds={"surgery": t_surgery, "total": time.perf_counter() - t0},
                          real=real, real_images=sum(len(x) for x in real_batches), diverging=diverging)
    report["blocks_removed"] = list(depth.branches_removed)
    report["constant_channels_folded"] = fold.channels_folded
    report["constant_maps_added"] = list(fold.bias_maps)
    report["blocked_by"] = dict(sorted(pruned.blocked.items(), key=lambda kv: -kv[1]))
    report["features_selected"] = {k: list(v) for k, v in features.selected.items()}
    report["kernels_shrunk"] = {k: [list(a), list(b)] for k, (a, b) in shrunk.shrunk.items()}
    report["shape_lowering"] = lowered.report()
    return CompressResult(compact, report, check)


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred shapes: the channel analysis reads channel counts from them."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return model  # what cannot be inferred stays unknown, and unknown channels stay


def finish(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes inferred afresh and the full checker: a pass that wrote an invalid graph is a bug."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=True, data_prop=True)
        onnx.checker.check_model(out, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise SurgeryError(f"The surgery produced an invalid model ({exc}); please report this model.") from exc
    return out


def build_report(before: onnx.ModelProto, after: onnx.ModelProto, check: VerifyResult, *,
                 channels_removed: int, seconds: dict[str, float], real: VerifyResult | None = None,
                 real_images: int = 0, diverging: Divergence | None = None) -> dict[str, Any]:
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
                         "inputs": check.n_inputs,
                         # On the real images alone (--data): how many, and how often top-1 agrees.
                         "real_images": real_images,
                         "real_rel": real.rel if real else None,
                         "real_top1_agreement": real.top1_agreement if real else None,
                         # Set only when verification failed and a shared value shows where.
                         "first_diverging_node": asdict(diverging) if diverging else None},
        "seconds": seconds,
    }
