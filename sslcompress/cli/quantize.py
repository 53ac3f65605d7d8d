"""quantize: INT8 (QDQ) on top of structure, scored before and after."""

from __future__ import annotations

import json

import click

from . import EPILOG_DATA, main


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Where the INT8 (QDQ) model goes.")
@click.option("--data", required=True, metavar="SPEC",
              help="Calibration images come from its training split, top-1 from its test split ("
                   + EPILOG_DATA.removeprefix("Data sets: ").rstrip(".") + ").")
@click.option("--calibration", default=256, show_default=True, type=click.IntRange(min=1),
              help="Training images to calibrate the activation ranges on.")
@click.option("--data-limit", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Test images to score the float32 and the INT8 model on.")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="How the activation ranges are calibrated.")
@click.option("--per-tensor", is_flag=True, help="One scale per weight tensor instead of one per output channel.")
@click.option("--space-to-depth/--no-space-to-depth", "space_to_depth", default=None,
              help="Fold the stride of convolutions over at most 4 channels (the stem) into the channels before "
                   "quantizing: the same sums, a faster integer kernel. Default: on x86 CPUs.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the report as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of lines.")
def quantize(model: str, out: str, data: str, calibration: int, data_limit: int, method: str, per_tensor: bool,
             space_to_depth: bool | None, seed: int, report_path: str | None, as_json: bool) -> None:
    """Static INT8 quantization of an ONNX image model in ONNX Runtime (QDQ, per-channel weights)."""
    from ..console import print_quantize_report
    from ..io import atomic_write_group, check_distinct_paths
    from ..quantize import quantize_model
    from ..surgery.export import load_onnx

    check_distinct_paths([("-o/--output", out), ("--report", report_path)], [("MODEL", model)])
    result = quantize_model(load_onnx(model), data, calibration=calibration, test_images=data_limit,
                            method=method, per_channel=not per_tensor, seed=seed,
                            space_to_depth=space_to_depth)
    report = {"model": model, "output": out, **result.report}
    outputs = [(out, result.model.SerializeToString())]
    if report_path:
        outputs.append((report_path, json.dumps(report, indent=2).encode()))
    atomic_write_group(outputs)  # the model and its report, all or none
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    print_quantize_report(report)
    click.echo(f"int8 model: {out}")
