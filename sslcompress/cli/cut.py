"""surgery and export: stage 2."""

from __future__ import annotations

import json
from typing import Any

import click

from . import EPILOG_DATA, align_value, main


def _surgery_options(f):
    opts = [
        click.option("--data", default=None, metavar="SPEC",
                     help="Also verify on real test images of this data set (" + EPILOG_DATA.removeprefix(
                         "Data sets: ").rstrip(".") + "); they must have the model's input shape."),
        click.option("--data-limit", default=64, show_default=True, type=click.IntRange(min=1),
                     help="At most this many real images for --data."),
        click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
                     help="Also write the report as JSON here."),
        click.option("--force", is_flag=True, help="Write the compact model even if verification fails."),
        click.option("--shape-lowering", type=click.Choice(["off", "on", "predict", "auto"]), default=None,
                     help="Rewrite convs with irregular zero weight columns as im2col of the kept columns + MatMul: "
                          "predict (default) where at least 75% of the columns are zero, on always, off never, auto "
                          "where it times faster in ONNX Runtime (CPU, 1 thread; depends on the machine's load, so "
                          "the report keeps the decisions as a plan)."),
        click.option("--lowering-plan", "lowering_plan", default=None, type=click.Path(dir_okay=False),
                     metavar="REPORT.json",
                     help="Replay the shape lowering decisions of an earlier surgery report (its --report file: "
                          "\"shape_lowering\" -> \"plan\"), without timing anything."),
        click.option("--align", "align", default=None, metavar="N|auto", callback=lambda _c, _p, v: _align_value(v),
                     help="Leave every conv's and matmul's input and output width at a multiple of N (or whole) by "
                          "keeping some zero channels: still exact, and ORT's blocked kernels run such widths "
                          "fastest. auto: ORT's channel block on this CPU (8 with AVX2, 16 with AVX-512)."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _align_value(value: str | None) -> int | str | None:
    """align_value, and a positive step: the cut has no config of its own to check it later."""
    n = align_value(value)
    if isinstance(n, int) and n < 1:
        raise click.BadParameter(f"{value!r} is not a positive number of channels")
    return n


def _resolve_align(align: int | str | None) -> int | None:
    """--align's channel step: auto reads ORT's NCHWc block on this CPU (1, no alignment, where it has none)."""
    if align != "auto":
        return align
    from ..latency.block import nchwc_block

    return nchwc_block("cpu")


def _where(node: dict[str, Any]) -> str:
    return f"node {node['node']!r} ({node['op_type']}, output {node['value']!r})"


def _onnx_bytes(model) -> bytes:
    from ..errors import UnsupportedModelError

    try:
        return model.SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GB
        raise UnsupportedModelError(f"The model is too large to write as a single ONNX file ({exc}).") from exc


def _write_compact(result, out: str, report_path: str | None, force: bool, as_json: bool,
                   extra: dict[str, Any] | None = None, uncut: tuple[str, Any] | None = None) -> None:
    """Verify first; then the compact model, the report and the uncut model (when given) all or none."""
    from ..errors import VerificationError
    from ..io import atomic_write_group

    report = {**result.report, **(extra or {})}
    v = report["verification"]
    node = v.get("first_diverging_node")
    if not v["passed"] and not force and v.get("nonfinite_output"):
        raise VerificationError(
            f"a model gives NaN or infinity at {v['nonfinite_output']}, and a model whose outputs are not "
            "finite is never accepted; nothing written (--force writes it anyway)")
    if not v["passed"] and not force:
        at = f", first at {_where(node)}" if node else ""
        raise VerificationError(
            f"the compact model differs from the uncut one by {v['max_abs']:.3g} (max |output| "
            f"{v['max_ref']:.3g}){at}; nothing written (--force writes it anyway)")
    outputs = [(out, _onnx_bytes(result.model))]
    if uncut is not None:
        outputs.append((uncut[0], _onnx_bytes(uncut[1])))
    if report_path:
        outputs.append((report_path, json.dumps(report, indent=2).encode()))
    atomic_write_group(outputs)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        from ..console import print_surgery_report

        print_surgery_report(report)
        if v.get("real_images"):
            agree = v.get("real_top1_agreement")
            click.echo(f"real images: {v['real_images']} from {report.get('data')}"
                       + (f", top-1 agreement {agree:.2%}" if agree is not None else ""))
        if node:
            click.echo(f"first diverging {_where(node)}: max abs difference {node['max_abs']:.3g}")
        click.echo(f"compact model: {out}")


def _check_prediction(dense: int, after: int, totals: dict[str, Any], force: bool, aligned: bool = False,
                      removed: int = 0) -> None:
    """The export's count check (surgery/export.py's check_export_counts), skipped with --force."""
    from ..errors import VerificationError
    from ..surgery.export import check_export_counts

    if force:
        return
    try:
        check_export_counts(dense, after, totals, aligned=aligned, removed=removed)
    except VerificationError as exc:
        raise VerificationError(f"{exc}; nothing written (--force writes it anyway)") from None


def _lowering(shape_lowering: str | None, plan_path: str | None):
    """What compress's shape_lowering takes: a mode name, or the plan read from an earlier report."""
    from ..errors import ConfigError
    from ..surgery.lowering import DEFAULT_MODE, read_plan

    if plan_path is None:
        return shape_lowering or DEFAULT_MODE
    if shape_lowering is not None:
        raise ConfigError("give --shape-lowering or --lowering-plan, not both: a plan replays decisions already made")
    return read_plan(plan_path)


def _real_inputs(proto, data: str | None, limit: int):
    from ..surgery.inputs import real_inputs

    return real_inputs(proto, data, limit=limit) if data else None


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Where the compact ONNX model goes.")
@_surgery_options
@click.option("--input-shape", default=None, metavar="C,H,W",
              help="Verify a model of a dynamic height and width on random inputs of this size (the sizes after the "
                   "batch, in the model's order); the compact model keeps its sizes dynamic. Without it, such a model "
                   "needs --data.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE",
              help="Verify on random inputs whose dimension NAME has this size (repeatable), e.g. sequence=128 for a "
                   "transformer exported with a dynamic sequence length; the compact model keeps it dynamic.")
def surgery(model: str, out: str, data: str | None, data_limit: int, report_path: str | None, force: bool,
            shape_lowering: str | None, lowering_plan: str | None, align: int | str | None, as_json: bool,
            input_shape: str | None, dims: tuple[str, ...]) -> None:
    """Delete exactly-zero channels from any ONNX model, verified against it in ONNX Runtime."""
    from ..errors import ConfigError
    from ..io import check_distinct_paths
    from ..surgery.compress import compress
    from ..surgery.export import load_onnx
    from ..surgery.inputs import check_dim_names, input_size_symbols
    from .sizes import named_sizes, parse_sizes

    check_distinct_paths([("-o/--output", out), ("--report", report_path)],
                         [("MODEL", model), ("--lowering-plan", lowering_plan)])
    lowering = _lowering(shape_lowering, lowering_plan)
    proto = load_onnx(model)
    sizes = input_size_symbols(proto, parse_sizes(input_shape)) if input_shape else {}
    for name, size in named_sizes(dims):
        if sizes.get(name, size) != size:
            raise ConfigError(f"--dim {name}={size} and --input-shape give {name!r} two sizes ({sizes[name]} and {size})")
        sizes[name] = size
    check_dim_names(proto, [name for name, _ in named_sizes(dims)])
    result = compress(proto, inputs=_real_inputs(proto, data, data_limit), shape_lowering=lowering,
                      align=_resolve_align(align), sizes=sizes or None)
    extra = {"data": data} if data else {}
    if sizes:
        extra["input_sizes"] = sizes
    _write_compact(result, out, report_path, force, as_json, extra or None)


def _check_runs(model, shape: tuple[int, ...], given: str) -> None:
    """One forward pass at the override shape, so a misfit is one sentence, not an exporter trace."""
    import torch

    from ..errors import ConfigError, first_line

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    except Exception as exc:
        first = first_line(exc)
        raise ConfigError(f"the checkpoint's model cannot run on --input-shape {given}: {first}") from exc
    finally:
        model.train(was_training)


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--onnx", "out", required=True, type=click.Path(dir_okay=False), help="The compact ONNX model.")
@click.option("--uncut", default=None, type=click.Path(dir_okay=False), help="Also write the model before surgery.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(min=11))
@click.option("--dynamic-batch", is_flag=True, help="Keep the batch dimension dynamic.")
@click.option("--input-shape", default=None, metavar="C,H,W",
              help="Export for inputs of this shape instead of the checkpoint's (e.g. 3,64,64).")
@_surgery_options
def export(checkpoint: str, out: str, uncut: str | None, opset: int, dynamic_batch: bool, input_shape: str | None,
           data: str | None, data_limit: int, report_path: str | None, force: bool, shape_lowering: str | None,
           lowering_plan: str | None, align: int | str | None, as_json: bool) -> None:
    """Export a checkpoint to ONNX (eval mode, onnxsim), delete its zero channels, verify."""
    from ..finetune.checkpoint import load_checkpoint
    from ..flops import count
    from ..io import check_distinct_paths
    from ..surgery.compress import compress
    from ..surgery.export import export_onnx
    from .sizes import parse_sizes

    check_distinct_paths([("--onnx", out), ("--uncut", uncut), ("--report", report_path)],
                         [("CHECKPOINT", checkpoint), ("--lowering-plan", lowering_plan)])
    override = parse_sizes(input_shape, 3) if input_shape is not None else None
    lowering = _lowering(shape_lowering, lowering_plan)
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build()
    shape = (1, *override) if override else ckpt.model.input_shape
    if override:
        _check_runs(model, shape, input_shape)
    # The checkpoint's own count of what its zero groups remove, beside what surgery removes. Counted first:
    # the analysis traces the model, and a TorchScript export before it can leave state that changes what
    # torch.export records (Hugging Face's Swin then shows control flow on a tensor's values).
    counted = count(model, shape)
    exported = export_onnx(model, shape, opset=opset, dynamic_batch=dynamic_batch)
    step = _resolve_align(align)
    result = compress(exported.model, inputs=_real_inputs(exported.model, data, data_limit),
                      shape_lowering=lowering, align=step)
    predicted = counted.macs_after
    totals = result.report["totals"]
    extra = {"checkpoint": checkpoint, "input_shape": list(shape), "predicted_macs": counted.macs,
             "predicted_macs_after": predicted, "macs_after_matches_prediction": predicted == totals["macs_after"]}
    if data:
        extra["data"] = data
    _check_prediction(counted.macs, predicted, totals, force, aligned=(step or 1) > 1,
                      removed=counted.macs_emptied)
    latency = _latency_check(ckpt, exported.model, result, shape, override is not None)
    if latency and "measured_ms" in latency and totals["macs_after"] != predicted and (step or 1) > 1:
        # The table predicted the checkpoint's widths; the alignment kept channels past them.
        aligned = f"predicted for the checkpoint's widths; --align {step} kept {totals['macs_after'] / predicted:.2f}x their MACs"
        latency["note"] = f"{latency['note']}; {aligned}" if latency.get("note") else aligned
    if latency:
        extra["latency"] = latency
    _write_compact(result, out, report_path, force, as_json, extra,
                   uncut=(uncut, exported.model) if uncut else None)
    if latency and not as_json:
        click.echo(_latency_line(latency))


def _latency_check(ckpt, uncut, result, shape, resized: bool) -> dict[str, Any] | None:
    """A checkpoint trained to --target-latency: its compact model timed in that session against the prediction;
    a note instead where the export cannot be timed there (another input size, a static batch of another size)."""
    from ..latency.measured import batch_fits, measure_against_prediction

    row = (ckpt.report or {}).get("latency")
    if not row:
        return None
    if resized:
        return {**row, "note": "not measured: exported for another input size than the table's"}
    if not (batch_fits(uncut, row["batch"]) and batch_fits(result.model, row["batch"])):
        return {**row, "note": f"not measured: the table is for batch {row['batch']}; export with --dynamic-batch"}
    if not result.verification.passed:
        return {**row, "note": "not measured: the compact model failed verification"}
    return measure_against_prediction(uncut, result.model, row, shape)


def _latency_line(row: dict[str, Any]) -> str:
    head = (f"latency ({row['provider']}, {row['threads']} thread(s), batch {row['batch']}): predicted "
            f"{row['predicted_ms']:.3g} ms (asked {row['asked_ms']:.3g} ms)")
    if "measured_ms" not in row:
        return f"{head}; {row['note']}"
    return (f"{head}, measured {row['measured_ms']:.3g} ms (predicted/measured {row['predicted_over_measured']:.2f}; "
            f"uncut measured {row['uncut_measured_ms']:.3g} ms in the same rounds, relative "
            f"{row['relative_predicted_over_measured']:.2f})" + (f"; {row['note']}" if row.get("note") else ""))


