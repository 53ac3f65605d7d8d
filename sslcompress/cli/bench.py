"""bench and demo: stage 3, and all three stages at once."""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import main


def _int_list(text: str, flag: str, allow_all: bool = False) -> tuple[int, ...]:
    """'1,2' (and 'all' = the CPUs this process may use) as positive ints, in order, without repeats."""
    from ..bench.paper import cpus
    from ..errors import ConfigError

    out: list[int] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        try:
            n = cpus() if allow_all and part == "all" else int(part)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"{flag} wants positive integers separated by commas"
                              + (" (or 'all')" if allow_all else "") + f", got {text!r}")
        if n not in out:
            out.append(n)
    if not out:
        raise ConfigError(f"{flag} is empty")
    return tuple(out)


def _bench_inputs(target: str | None, dense: str | None, unstructured: str | None,
                  structured: str | None) -> list[tuple[str, str | None]]:
    inputs: list[tuple[str, str | None]] = [("RUN_DIR_OR_CHECKPOINT", target), ("--dense", dense),
                                            ("--unstructured", unstructured), ("--structured", structured)]
    if target and Path(target).is_dir():  # a run folder: the checkpoints read from it
        from ..finetune.pipeline import PRETRAINED, SPARSE

        inputs += [(f"RUN_DIR_OR_CHECKPOINT ({name})", str(Path(target) / name)) for name in (SPARSE, PRETRAINED)]
    return inputs


def _extra_variants(given: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Each --variant NAME=ONNX as (name, path); the names are checked with the rest of the options."""
    from ..errors import ConfigError

    out = []
    for text in given:
        name, sep, path = text.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--variant wants NAME=MODEL.onnx, got {text!r}")
        out.append((name.strip(), path.strip()))
    return tuple(out)


def _bench_outputs(out: str | None, markdown: str | None, plot: str | None,
                   models_dir: str | None, int8: bool = False, extra: list[str] | None = None
                   ) -> list[tuple[str, str | None]]:
    from ..bench.variants import DENSE_INT8, STRUCTURED_INT8, VARIANTS

    outputs: list[tuple[str, str | None]] = [("--out", out), ("--markdown", markdown), ("--plot", plot)]
    if models_dir:
        names = (*VARIANTS, DENSE_INT8, STRUCTURED_INT8) if int8 else VARIANTS
        names = (*names, *(extra or ()))
        outputs += [(f"--models-dir ({name}.onnx)", str(Path(models_dir) / f"{name}.onnx")) for name in names]
    return outputs


def _plot_bytes(result) -> bytes:
    """The PNG chart as bytes, so it is written together with the other outputs."""
    from ..bench.plot import plot as write_plot
    from ..io import private_temp_dir

    with private_temp_dir("sslcompress-plot") as tmp:
        path = tmp / "plot.png"
        write_plot(result, path)
        return path.read_bytes()


@main.command()
@click.argument("target", required=False, metavar="[RUN_DIR_OR_CHECKPOINT]")
@click.option("--dense", default=None, metavar="ONNX", help="Time this ONNX model as the dense variant.")
@click.option("--unstructured", default=None, metavar="ONNX",
              help="This ONNX model as the unstructured variant (e.g. your finetune --method l1 model).")
@click.option("--structured", default=None, metavar="ONNX", help="This ONNX model as the structured variant.")
@click.option("--provider", "providers", multiple=True, metavar="cpu|cuda",
              help="ONNX Runtime execution provider; repeatable or a comma list (default cpu). cuda needs "
                   "onnxruntime-gpu: pip install sslcompress[gpu].")
@click.option("--threads", default="1,all", show_default=True, help="Intra-op thread counts, e.g. 1,2 or 1,all.")
@click.option("--batch", "batches", default=None, help="Batch sizes, e.g. 1,8 (default 1,8; a model with a "
                                                       "static batch: that one).")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0),
              help="Untimed runs of each variant before timing.")
@click.option("--repeat", default=None, type=click.IntRange(min=1),
              help="Interleaved rounds per provider, threads and batch (default 20).")
@click.option("--min-time", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Instead of --repeat: run rounds for at least this many seconds (and at least 5 rounds).")
@click.option("--data", default=None, metavar="SPEC",
              help="Also top-1 accuracy of each variant on this data set's test images (any finetune --data spec, "
                   "e.g. digits or cifar10:PATH).")
@click.option("--data-limit", default=1000, show_default=True, type=click.IntRange(min=1),
              help="At most this many test images for --data.")
@click.option("--variant", "extra", multiple=True, metavar="NAME=ONNX",
              help="Also time this ONNX model under NAME beside the others (repeatable): another tool's pruned "
                   "model, another export. It must take the dense model's inputs and give its outputs.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE",
              help="Fix a named input dimension at a size for every variant (repeatable), e.g. sequence=128 for a "
                   "transformer exported with a dynamic sequence length.")
@click.option("--input-shape", default=None, metavar="C,H,W",
              help="Bench models of a dynamic input size at this one: the sizes after the batch, in the model's "
                   "order (3,224,224; 224,224,3 for a channels-last input). Checkpoints are exported at it.")
@click.option("--int8", is_flag=True,
              help="Also dense-int8 and structured-int8: the dense and the structured model after ONNX Runtime's "
                   "static INT8 quantization (QDQ, as `quantize`), calibrated on --data's training images.")
@click.option("--calibration", default=256, show_default=True, type=click.IntRange(min=1),
              help="Training images of --data that calibrate the INT8 activation ranges (--int8).")
@click.option("--layers", "layer_study", is_flag=True,
              help="Also the per-layer study: each conv as one GEMM, dense vs CSR (unstructured) vs compact.")
@click.option("--paper-table", type=click.Choice(["alexnet"]), default=None,
              help="Also the paper's Table 4 on this CPU (no model needed), ours beside the paper's.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of tables.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the result as JSON here.")
@click.option("--markdown", default=None, type=click.Path(dir_okay=False), help="Write a Markdown summary here.")
@click.option("--plot", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG chart here (needs matplotlib: pip install sslcompress[plot]).")
@click.option("--models-dir", default=None, type=click.Path(file_okay=False),
              help="Also write the ONNX variants here (dense.onnx, unstructured.onnx, structured.onnx; with "
                   "--int8 also dense-int8.onnx, structured-int8.onnx).")
@click.option("--no-pin", is_flag=True, help="Leave thread placement to the OS (default: the timing thread and "
                                           "ORT's workers on the same CPUs for every variant).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the input and the bootstrap.")
@click.option("--quiet", "-q", is_flag=True, help="No progress.")
def bench(target: str | None, dense: str | None, unstructured: str | None, structured: str | None,
          extra: tuple[str, ...], dims: tuple[str, ...],
          providers: tuple[str, ...], threads: str, batches: str | None, warmup: int, repeat: int | None,
          min_time: float | None, data: str | None, data_limit: int, input_shape: str | None, int8: bool,
          calibration: int,
          layer_study: bool, paper_table: str | None, as_json: bool, out: str | None, markdown: str | None, plot: str | None, models_dir: str | None,
          no_pin: bool, seed: int, quiet: bool) -> None:
    """Time the dense, unstructured-sparse and structured-sparse model side by side in ONNX Runtime
    (with --int8, also the dense and the structured model in INT8).

    RUN_DIR_OR_CHECKPOINT: a finetune run folder (sparse.pt, and pretrained.pt as the dense model when
    present), a checkpoint, or an ONNX model with exact zeros. Stock ONNX Runtime runs the unstructured
    model with dense kernels; the output says so.
    """
    from ..bench.config import BenchConfig
    from ..bench.plot import require_matplotlib
    from ..bench.run import model_files, run_bench
    from ..console import BenchProgress, print_bench
    from ..io import atomic_write_group, check_distinct_paths
    from .sizes import named_sizes, parse_sizes

    extras = _extra_variants(extra)
    check_distinct_paths(_bench_outputs(out, markdown, plot, models_dir, int8, [n for n, _ in extras]),
                         _bench_inputs(target, dense, unstructured, structured)
                         + [(f"--variant {n}", p) for n, p in extras])
    config = BenchConfig(
        target=target, dense=dense, unstructured=unstructured, structured=structured,
        providers=tuple(dict.fromkeys(p.strip().lower() for v in (providers or ("cpu",)) for p in v.split(",")
                                      if p.strip())),
        threads=_int_list(threads, "--threads", allow_all=True),
        batches=_int_list(batches, "--batch") if batches is not None else None,
        warmup=warmup, repeat=repeat, min_time=min_time, data=data, data_limit=data_limit, int8=int8,
        calibration=calibration, layers=layer_study, paper_table=paper_table, models_dir=models_dir, pin=not no_pin,
        seed=seed, extra=extras, dims=named_sizes(dims), input_size=parse_sizes(input_shape) if input_shape else None)
    if plot:
        require_matplotlib()
    with BenchProgress(enabled=not (quiet or as_json)) as progress:
        result = run_bench(config, progress.on_event, write_models=False)
    outputs: list[tuple[str | Path, bytes]] = list(model_files(config, result.models))  # all written, or none
    if out:
        outputs.append((out, (json.dumps(result.to_dict(), indent=2)).encode()))
    if markdown:
        from ..bench.report import render_markdown

        outputs.append((markdown, render_markdown(result).encode()))
    if plot:
        outputs.append((plot, _plot_bytes(result)))
    atomic_write_group(outputs)
    if as_json:
        click.echo(result.to_json())
        return
    print_bench(result)
    for what, path in (("json", out), ("markdown", markdown), ("plot", plot), ("models", models_dir)):
        if path:
            click.echo(f"{what + ':':10} {path}")


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the checkpoints, the ONNX models and the reports.")
@click.option("--model", type=click.Choice(["lenet5", "resnet20", "vit"]), default="lenet5", show_default=True,
              help="lenet5 and resnet20 learn filters and channels; vit (the built-in vit_tiny) MLP neurons and "
                   "attention heads, to half the MACs.")
@click.option("--threads", default="1", show_default=True, help="Thread counts to bench, e.g. 1,2.")
@click.option("--quick", is_flag=True, help="A smoke-test size: one epoch per phase, few images, 3 rounds.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(out: str, model: str, threads: str, quick: bool, quiet: bool) -> None:
    """All three stages on the bundled digits: finetune, export (surgery), bench on the CPU."""
    from ..bench.plot import plot, plot_available
    from ..bench.report import render_markdown
    from ..bench.run import run_bench
    from ..console import BenchProgress, Progress, print_bench, print_report, print_surgery_report
    from ..demo import DEMO_MODELS, DemoPaths, bench_config, export_stage, finetune_config, unstructured_stage
    from ..finetune.pipeline import run_finetune
    from ..io import atomic_write_bytes, atomic_write_json

    paths = DemoPaths(Path(out))
    click.echo(f"1/4 finetune: {DEMO_MODELS[model]['model']} on digits (baseline first), SSL, fine-tune -> {paths.sparse}")
    with Progress(enabled=not quiet) as progress:
        trained = run_finetune(finetune_config(paths, model, quick), progress.on_event)
    print_report(trained.report)
    click.echo(f"2/4 export: ONNX, surgery, verification in ONNX Runtime -> {paths.compact}")
    cut = export_stage(paths)
    print_surgery_report(cut.report)
    click.echo("3/4 unstructured baseline: gradual magnitude pruning to the compact model's nonzeros per layer "
               f"over the sparsify epochs, then the same fine-tuning -> {paths.unstructured}")
    with Progress(enabled=not quiet) as progress:
        baseline = unstructured_stage(paths, progress.on_event)
    click.echo(f"unstructured: top-1 {baseline.accuracy:.2%} (one-shot pruning without training would leave "
               f"{baseline.accuracy_pruned:.2%})")
    click.echo("4/4 bench: dense vs unstructured vs structured, and dense and structured in INT8, in ONNX Runtime"
               " (CPU)")
    with BenchProgress(enabled=not quiet) as progress:
        result = run_bench(bench_config(paths, quick, _int_list(threads, "--threads", allow_all=True)),
                           progress.on_event)
    atomic_write_json(result.to_dict(), paths.bench_json)
    atomic_write_bytes(render_markdown(result).encode(), paths.bench_markdown)
    written = [("pretrained", paths.pretrained), ("sparse", paths.sparse), ("unstructured", paths.unstructured),
               ("uncut", paths.uncut),
               ("compact", paths.compact), ("surgery", paths.surgery_report), ("bench", paths.bench_json),
               ("markdown", paths.bench_markdown)]
    if plot_available():
        plot(result, paths.bench_plot)
        written.append(("plot", paths.bench_plot))
    print_bench(result)
    for what, path in written:
        click.echo(f"{what + ':':12} {path}")
