"""Surgery of a whole ONNX model: passes, then verification against the uncut model, then a report."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from ..errors import ConfigError, DataError, SurgeryError, UnsupportedModelError
from .diverge import Divergence, first_diverging_node
from .export import load_onnx
from .inputs import FeedLike, as_feeds, check_verifiable, random_batches
from .lowering import lower_sparse_columns_ir
from .measure import OnnxLayer, layers_of, parameters_of, symbol_sizes
from .passes import Surgery
from .prepare import InferShapesPass
from .verify import VerifyResult, compare


def _check_arguments(model: Any, inputs: Any, rtol_of_max: Any, align: Any = None, sizes: Any = None) -> None:
    """The package's own errors for arguments of the wrong type or range, before any work."""
    if not isinstance(model, (onnx.ModelProto, str, Path)):
        hint = " (pass its .model)" if isinstance(getattr(model, "model", None), onnx.ModelProto) else ""
        raise UnsupportedModelError(f"compress takes an onnx.ModelProto or the path of an .onnx file, "
                                    f"got {type(model).__name__}{hint}.")
    if isinstance(rtol_of_max, bool) or not isinstance(rtol_of_max, (int, float)):
        raise ConfigError(f"rtol_of_max must be a number, got {type(rtol_of_max).__name__}.")
    if not (math.isfinite(rtol_of_max) and rtol_of_max > 0):
        raise ConfigError(f"rtol_of_max must be a finite number > 0, got {rtol_of_max}.")
    if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise ConfigError(f"align must be a whole number >= 1 (channels), got {align!r}.")
    if sizes is not None and (not isinstance(sizes, Mapping) or any(
            not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 1 for k, v in sizes.items())):
        raise ConfigError(f"sizes must map dimension names to positive sizes, got {sizes!r}.")
    if inputs is not None and (isinstance(inputs, (str, bytes, dict)) or not isinstance(inputs, Sequence)):
        raise DataError(f"inputs must be a list of batches (arrays or name -> array dicts), got {type(inputs).__name__}.")


@dataclass(frozen=True)
class CompressResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    verification: VerifyResult


def compress(model: onnx.ModelProto | str | Path, *, inputs: Sequence[FeedLike] | None = None,
             rtol_of_max: float = 1e-4, shape_lowering: str = "predict",
             lowering_plan: Any = None, align: int | None = None,
             sizes: Mapping[str, int] | None = None) -> CompressResult:
    """The compact model and its report; `verification.passed` says whether it may be written.

    The model is read into onnx_ir once, every pass changes it in place (passes.py), and it is
    written out once. ``shape_lowering`` is off, on, predict (the default: deterministic) or auto
    (measured on this machine; its decisions are in the report's plan), and ``lowering_plan``
    replays the plan of an earlier report. ``align`` leaves every conv's and matmul's input and output
    width at a multiple of it (or whole) by keeping some dead channels, still exactly: the widths the
    runtime's blocked kernels run fastest (ORT's NCHWc block on CPUs: `sslcompress.latency.block.nchwc_block`).
    ``sizes`` (symbol -> size) sizes the random inputs' dynamic dimensions other than the batch, where no real
    input does (a detector exported with a free height and width); the compact model keeps them dynamic.
    """
    _check_arguments(model, inputs, rtol_of_max, align, sizes)
    t0 = time.perf_counter()
    proto = load_onnx(model) if isinstance(model, (str, Path)) else model
    # What verification will feed, settled before any pass: a model it cannot run is refused first.
    check_verifiable(proto, inputs, sizes=sizes)
    real_batches = as_feeds(proto, list(inputs or []))
    random = random_batches(proto, real_batches, sizes=sizes)
    work = ir.serde.deserialize_model(proto)
    surgery = Surgery(align)
    surgery.prepare(work)
    # MACs at the sizes verification runs (per sample): dynamic sequence and image sizes count as run.
    sizes = symbol_sizes(proto, random[0] if random else None)
    before, params_before = layers_of(work, sizes), parameters_of(work)
    qoperator = _qoperator_layers(work)
    surgery.cut(work)
    # Last: it reads the convs as they will run.
    lowered = lower_sparse_columns_ir(work, None if lowering_plan is not None else shape_lowering, plan=lowering_plan,
                                      keep_zero_channels=(align or 1) > 1)
    if lowered.lowered:
        InferShapesPass()(work)
    after, params_after = layers_of(work, sizes), parameters_of(work)
    lowering = lowered.report()
    compact = finish(ir.serde.serialize_model(work))
    # Nothing reads the onnx_ir model (and the weights the passes wrote) past here; verification's
    # two ORT sessions are the peak of the call's memory, so it goes first.
    del work, lowered
    t_surgery = time.perf_counter() - t0
    # Counting a model's bytes encodes it: done before the ORT sessions exist, so that buffer does not
    # add to their peak.
    size = (proto.ByteSize(), compact.ByteSize())
    # Random batches (of the real inputs' shape where the model's is dynamic), then the real ones.
    check = compare(proto, compact, random + real_batches, n_random=0, rtol_of_max=rtol_of_max)
    real = compare(proto, compact, real_batches, n_random=0, rtol_of_max=rtol_of_max) if real_batches else None
    diverging = None if check.passed else first_diverging_node(
        proto, compact, random[:2] + real_batches[:2], rtol_of_max=rtol_of_max)
    pruned, depth, fold = surgery.prune.result, surgery.depth.result, surgery.fold.result
    report = build_report(before, after, check, params=(params_before, params_after),
                          nodes=(len(proto.graph.node), len(compact.graph.node)),
                          size=size,
                          channels_removed=pruned.channels_removed,
                          seconds={"surgery": t_surgery, "total": time.perf_counter() - t0},
                          real=real, real_images=sum(len(next(iter(f.values()))) for f in real_batches if f),
                          diverging=diverging)
    report["blocks_removed"] = list(depth.branches_removed)
    # Branches that computed a constant per channel (their first layer's filters all zero), now that constant.
    report["blocks_constant"] = list(depth.branches_constant)
    report["quantized_weights"] = sum(lay.quantized for lay in before)
    # Layers quantized in the QOperator format compute in integers inside one op: walls, said so.
    report["qoperator_layers"] = qoperator
    report["constant_channels_folded"] = fold.channels_folded
    report["constant_maps_added"] = list(fold.bias_maps)
    report["constant_channels_kept"] = dict(fold.kept)  # conv -> why the constant channels it reads stay
    report["blocked_by"] = dict(sorted(pruned.blocked.items(), key=lambda kv: -kv[1]))
    # Zeros found but not used, and why: channels of weighted layers, and zero residual branches.
    report["zeros_kept"] = dict(pruned.zeros_kept)
    report["align"] = align
    report["zero_branches_kept"] = dict(depth.branches_kept)
    report["features_selected"] = {k: list(v) for k, v in surgery.features.result.selected.items()}
    report["kernels_shrunk"] = {k: [list(a), list(b)] for k, (a, b) in surgery.kernels.result.shrunk.items()}
    report["shape_lowering"] = lowering
    return CompressResult(compact, report, check)


QOPERATOR_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd",
                 "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool")


def _qoperator_layers(model: ir.Model) -> dict[str, int]:
    found: dict[str, int] = {}
    for node in model.graph:
        if node.op_type in QOPERATOR_OPS:
            found[node.op_type] = found.get(node.op_type, 0) + 1
    return found


def finish(model: onnx.ModelProto) -> onnx.ModelProto:
    """The full checker (strict shape inference included): a pass that wrote an invalid graph is a bug."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise SurgeryError(f"The surgery produced an invalid model ({exc}); please report this model.") from exc
    return model


def build_report(before: list[OnnxLayer], after: list[OnnxLayer], check: VerifyResult, *,
                 params: tuple[int, int], nodes: tuple[int, int], size: tuple[int, int],
                 channels_removed: int, seconds: dict[str, float], real: VerifyResult | None = None,
                 real_images: int = 0, diverging: Divergence | None = None) -> dict[str, Any]:
    la = {lay.name: lay for lay in after}
    rows = []
    for lb in before:
        a = la.get(lb.name)
        rows.append({"name": lb.name, "op": lb.op, "weight": list(lb.weight_shape),
                     "group": lb.group, "group_after": a.group if a else None,
                     "weight_after": list(a.weight_shape) if a else None,
                     "macs": lb.macs, "macs_after": a.macs if a else 0})
    macs = sum(r["macs"] for r in rows)
    macs_after = sum(r["macs_after"] for r in rows)
    return {
        "layers": rows,
        "totals": {
            "macs": macs, "macs_after": macs_after, "macs_fraction": macs_after / macs if macs else 1.0,
            "params": params[0], "params_after": params[1],
            "nodes": nodes[0], "nodes_after": nodes[1],
            "bytes": size[0], "bytes_after": size[1],
            "channels_removed": channels_removed,
        },
        "verification": {"max_abs": check.max_abs, "max_ref": check.max_ref, "rel": check.rel,
                         "worst_output": check.where, "rtol": check.rtol,
                         # The first output that held a NaN or infinity (in either model): never accepted.
                         "nonfinite_output": check.nonfinite,
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
