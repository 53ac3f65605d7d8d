"""profile: the per-layer latency table of a model on this machine, measured in ONNX Runtime."""

from __future__ import annotations

import json
from typing import Any

import click

from . import main


def _model(name: str | None, weights: str | None, input_shape: str | None, num_classes: int | None):
    """The model --model / --weights name (a checkpoint's own spec where it has one), weights loaded, and the
    (1, C, H, W) shape it is profiled at."""
    from ..errors import CheckpointError, ConfigError
    from ..finetune.checkpoint import load_weights, read_weights
    from ..models import ModelSpec, build_model, natural_input
    from .sizes import parse_sizes

    state, ckpt = read_weights(weights) if weights else (None, None)
    if ckpt is not None and name and name != ckpt.model.name:
        raise CheckpointError(f"{weights} is a checkpoint of {ckpt.model.name}, not of {name}")
    name = name or (ckpt.model.name if ckpt else None)
    if name is None:
        raise ConfigError("give --model NAME (or --weights with an sslcompress checkpoint)")
    if input_shape:
        channels, *size = parse_sizes(input_shape, 3)
    elif ckpt is not None:
        channels, size = ckpt.model.in_channels, ckpt.model.input_size
    else:
        channels, size = natural_input(name)
    classes = num_classes or (ckpt.model.num_classes if ckpt else 10)
    spec = ModelSpec(name, num_classes=classes, in_channels=channels, input_size=tuple(size))
    model = build_model(spec).eval()
    if state is not None:
        load_weights(model, state, source=str(weights))
    return model, spec


def _rows(table, structure) -> list[dict[str, Any]]:
    from ..latency.predict import layer_latency
    from ..latency.signature import signatures_of

    rows = []
    for name, lay in structure.layers.items():
        sig = signatures_of(lay)[0]
        entry = table.entries[sig.ident()]
        widths = f"{len(entry.ins())}" if sig.depthwise else f"{len(entry.ins())}x{len(entry.outs())}"
        rows.append({"layer": name, "signature": sig.ident(), "widths_measured": widths,
                     "points": len(entry.points), "dense_ms": layer_latency(table, lay)})
    return rows


@main.command()
@click.option("--model", default=None, help="Built-in name, torchvision:NAME, path/file.py:factory or "
                                            "pkg.module:factory (default: the --weights checkpoint's model).")
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="An sslcompress checkpoint or a state_dict file (its model and input shape are used).")
@click.option("--input-shape", default=None, metavar="C,H,W",
              help="Input of one sample (default: the checkpoint's, else the model's natural input).")
@click.option("--num-classes", default=None, type=click.IntRange(min=1),
              help="Classifier outputs (default: the checkpoint's, else 10).")
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="ONNX Runtime execution provider (cuda needs onnxruntime-gpu).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="Intra-op threads.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Batch size.")
@click.option("--step", default=None, type=click.IntRange(min=1),
              help="Width grid step (default: about 16 widths per axis, multiples of 8 where the width allows).")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(min=1),
              help="How long each op is timed: on the CPU it runs for N x 5 ms and its compute time is the mean "
                   "of the middle half of the runs; on CUDA, N samples of 5 ms, the median kept.")
@click.option("--table", "table_path", default=None, type=click.Path(dir_okay=False),
              help="The table file (default: ~/.cache/sslcompress/latency/<machine>-<hash>.json, or under "
                   "$SSLCOMPRESS_CACHE_DIR).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def profile(model: str | None, weights: str | None, input_shape: str | None, num_classes: int | None,
            provider: str, threads: int, batch: int, step: int | None, rounds: int, table_path: str | None,
            as_json: bool, quiet: bool) -> None:
    """Measure the per-layer latency table of a model in ONNX Runtime (what the table lacks only).

    Each conv and linear layer's op is timed alone on a grid of (input width, output width), and the whole
    dense model once; `sslcompress.latency.predict` then predicts any thinned model's latency from it.
    """
    from ..console import BenchProgress
    from ..finetune.structure import analyze
    from ..latency import current_key, default_path, load_or_new, predict_dense, profile_model, save_table
    from ..latency.predict import fingerprint
    from ..latency.step import channel_step
    from ..runtime import probe_cuda

    if provider == "cuda":
        probe_cuda()  # one sentence before any work where the GPU package or the GPU is missing
    key = current_key(provider, threads, batch)
    path = table_path or default_path(key)
    table = load_or_new(path, key, on_stale=lambda why: click.echo(f"note: {why}", err=True))
    net, spec = _model(model, weights, input_shape, num_classes)
    shape = spec.input_shape
    structure = analyze(net, shape)
    measured = []
    with BenchProgress(enabled=not (quiet or as_json)) as progress:
        def on_progress(e) -> None:
            measured.append(e)
            progress.on_event(e)

        profile_model(net, shape, key, table, step, on_progress, name=spec.name, rounds=rounds, structure=structure)
    save_table(table, path)
    rows = _rows(table, structure)
    step = channel_step(table)
    timing = table.models.get(fingerprint(structure))
    calibration = dict(zip(("constant_ms", "blocked_factor", "plain_factor"), timing.calibration())) if timing else None
    summary = {"table": str(path), "key": key.to_dict(), "model": spec.name, "input_shape": list(shape[1:]),
               "measured": len(measured), "dense_ms": predict_dense(table, structure), "layers": rows,
               "channel_step": step.step, "calibration": calibration}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    width = max(len("layer"), *(len(r["layer"]) for r in rows))
    click.echo(f"{'layer':<{width}}  {'widths':>8}  {'dense ms':>9}")
    for r in rows:
        click.echo(f"{r['layer']:<{width}}  {r['widths_measured']:>8}  {r['dense_ms']:>9.4f}")
    click.echo(f"{spec.name} dense: {summary['dense_ms']:.4f} ms (whole model, batch {batch}, {threads} thread(s)); "
               f"{len(measured)} measurement(s) this run")
    click.echo(f"ORT's channel block on this CPU: {key.block}; --align auto reads {step.describe()}")
    if calibration is not None:
        click.echo(f"calibration by {len(timing.runs)} whole models: {calibration['constant_ms']:+.4f} ms + "
                   f"{calibration['blocked_factor']:.3f} x blocked ops + {calibration['plain_factor']:.3f} x plain ops")
    click.echo(f"table: {path}")
