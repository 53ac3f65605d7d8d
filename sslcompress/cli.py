"""The `sslcompress` command: a thin click layer over the library. Only this module talks to the user."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import SSLCompressError

EPILOG_DATA = ("Data sets: digits (default, bundled with scikit-learn), mnist:PATH, cifar10:PATH, "
               "imagefolder:PATH, npz:PATH, synthetic[:CxHxW:K].")


class _Group(click.Group):
    """Turns our typed errors into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SSLCompressError as exc:
            # One line, whatever the message holds.
            click.echo("error: " + " ".join(str(exc).split()), err=True)
            sys.exit(2)
        except OSError as exc:
            # A full disk, a folder we may not write: the user's to fix, so one line, no traceback.
            click.echo(f"error: {exc.strerror or exc} ({exc.filename or 'I/O'})", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun with --resume to continue from the last finished epoch", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sslcompress")
def main() -> None:
    """Structured Sparsity Learning for CNNs: finetune -> export -> bench."""


def _run_options(f):
    opts = [
        click.option("--model", default=None,
                     help="Built-in name (lenet5, mlp, convnet, resnet20/32/56, alexnet, vgg16, vgg16_bn, resnet18, "
                          "resnet50), torchvision:NAME, path/file.py:factory or pkg.module:factory. "
                          "Default: the --weights checkpoint's model, else lenet5."),
        click.option("--data", default=None, help="Data set spec. " + EPILOG_DATA + " Default: digits."),
        click.option("--weights", default=None, type=click.Path(dir_okay=False),
                     help="Pretrained weights: an sslcompress checkpoint or a state_dict file."),
        click.option("--out", default=None, type=click.Path(file_okay=False),
                     help="Run folder for checkpoints and reports. Default: runs/MODEL-DATA."),
        click.option("--recipe", default=None, type=click.Path(dir_okay=False),
                     help="TOML recipe with any of these options; flags given here win."),
        click.option("--seed", default=None, type=int, help="Random seed (default 0)."),
        click.option("--device", default=None, help="cpu (default) or cuda[:N]."),
        click.option("--threads", default=None, type=click.IntRange(min=1),
                     help="torch intra-op threads (default: torch's choice; 1 is faster on a busy machine)."),
        click.option("--limit-train", default=None, type=click.IntRange(min=1), help="Use only N training images."),
        click.option("--limit-test", default=None, type=click.IntRange(min=1), help="Use only N test images."),
        click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Batch size of every phase."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _default_out(model: str | None, data: str | None) -> str:
    m = (model or "lenet5").replace(":", "_").replace("/", "_").replace(".py", "")
    d = (data or "digits").split(":")[0]
    return str(Path("runs") / f"{m}-{d}")


def _run_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    out = kw.get("out") or None
    return {
        "model": kw.get("model"), "data": kw.get("data"), "weights": kw.get("weights"), "out": out,
        "seed": kw.get("seed"), "device": kw.get("device"), "threads": kw.get("threads"),
        "limit_train": kw.get("limit_train"), "limit_test": kw.get("limit_test"),
    }


def _phase(epochs: int | None, lr: float | None, batch_size: int | None) -> dict[str, Any] | None:
    d = {k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size}.items() if v is not None}
    return d or None


def _recipe(path: str | None) -> dict[str, Any] | None:
    from .config import read_recipe

    return read_recipe(path) if path else None


def _check_device(device: str | None) -> None:
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SSLCompressError(f"--device {device} asked for CUDA, but this torch sees no CUDA GPU")


@main.command()
@_run_options
@click.option("--epochs", default=None, type=click.IntRange(min=0), help="Training epochs (default 10).")
@click.option("--lr", default=None, type=float, help="Learning rate (default 0.02, cosine schedule).")
def pretrain(**kw: Any) -> None:
    """Train a dense baseline; writes RUN/pretrained.pt."""
    from .config import PretrainConfig, build_config
    from .console import Progress
    from .finetune.pipeline import run_pretrain

    recipe = _recipe(kw["recipe"])
    run = _run_overrides(kw)
    run["out"] = run["out"] or (recipe or {}).get("out") or _default_out(kw["model"] or (recipe or {}).get("model"),
                                                                          kw["data"] or (recipe or {}).get("data"))
    _check_device(run["device"])
    cfg = build_config(PretrainConfig, _flatten_recipe(recipe, "train"),
                       {**run, "train": _phase(kw["epochs"], kw["lr"], kw["batch_size"])})
    with Progress(enabled=not (kw["quiet"] or kw["as_json"]) and os.environ.get("RANK", "0") == "0") as progress:
        result = run_pretrain(cfg, progress.on_event)
    _finish(result, kw["as_json"])


def _flatten_recipe(recipe: dict[str, Any] | None, phase_key: str) -> dict[str, Any] | None:
    """A pretrain recipe may hold its training options at the top level or under [train]/[pretrain]."""
    if recipe is None:
        return None
    from dataclasses import fields

    from .config import RunOptions, TrainOptions

    run_keys = {f.name for f in fields(RunOptions)}
    train_keys = {f.name for f in fields(TrainOptions)}
    out: dict[str, Any] = {k: v for k, v in recipe.items() if k in run_keys}
    train = dict(recipe.get("pretrain", {}) if phase_key == "train" else {})
    train.update(recipe.get("train", {}))
    train.update({k: v for k, v in recipe.items() if k in train_keys})
    unknown = set(recipe) - run_keys - train_keys - {"train", "pretrain"}
    if unknown:
        raise SSLCompressError(f"unknown recipe key(s) for pretrain: {', '.join(sorted(unknown))}")
    if train:
        out["train"] = train
    return out


def _parse_lambdas(items: tuple[str, ...]) -> dict[str, float] | None:
    out: dict[str, float] = {}
    for item in items:
        kind, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[kind.strip()] = float(value)
        except ValueError:
            raise SSLCompressError(f"--lambda wants KIND=VALUE such as filter=0.1, got {item!r}") from None
    return out or None


@main.command()
@_run_options
@click.option("--structures", "-s", default=None,
              help="Comma list of filter, channel, shape, depth, kernel_row, kernel_col, or 'all' "
                   "(default filter,channel).")
@click.option("--lambda", "lambdas", multiple=True, metavar="KIND=VALUE",
              help="Group Lasso strength of one structure (repeatable), e.g. --lambda shape=0.2.")
@click.option("--strength", default=None, type=float, help="Strength of every structure without its own --lambda.")
@click.option("--method", type=click.Choice(["ssl", "l1"]), default=None,
              help="ssl (structured, default) or l1 (non-structured, for comparison).")
@click.option("--solver", type=click.Choice(["proximal", "subgradient"]), default=None,
              help="proximal group soft-thresholding (default, exact zeros) or the paper's subgradient + threshold.")
@click.option("--threshold", default=None, type=float, help="Zeroing threshold of the subgradient solver (1e-4).")
@click.option("--weighting", type=click.Choice(["none", "sqrt", "macs"]), default=None,
              help="Group weights: none, sqrt(group size), or the MACs a group costs.")
@click.option("--target-flops", default=None, type=float,
              help="Adjust lambda until at most this fraction of the dense MACs remains, e.g. 0.2.")
@click.option("--pretrain-epochs", default=None, type=click.IntRange(min=0))
@click.option("--sparsify-epochs", default=None, type=click.IntRange(min=0))
@click.option("--finetune-epochs", default=None, type=click.IntRange(min=0))
@click.option("--lr", default=None, type=float, help="Learning rate of the sparsify phase.")
@click.option("--finetune-lr", default=None, type=float, help="Learning rate of the fine-tune phase.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last finished epoch.")
def finetune(**kw: Any) -> None:
    """SSL on a pretrained model: sparsify, freeze zero groups, fine-tune.

    With no arguments: lenet5 on the bundled digits, pretraining the baseline first.
    Writes RUN/sparse.pt (checkpoint with masks and report) and RUN/report.json.
    """
    from .config import FinetuneConfig, build_config
    from .console import Progress
    from .finetune.pipeline import run_finetune

    recipe = _recipe(kw["recipe"]) or {}
    run = _run_overrides(kw)
    run["out"] = run["out"] or recipe.get("out") or _default_out(kw["model"] or recipe.get("model"),
                                                                  kw["data"] or recipe.get("data"))
    _check_device(run["device"])
    bs = kw["batch_size"]
    overrides = {
        **run,
        "structures": kw["structures"], "lambdas": _parse_lambdas(kw["lambdas"]), "strength": kw["strength"],
        "method": kw["method"], "solver": kw["solver"], "threshold": kw["threshold"],
        "weighting": kw["weighting"], "target_flops": kw["target_flops"], "resume": kw["resume"] or None,
        "pretrain": _phase(kw["pretrain_epochs"], None, bs),
        "sparsify": _phase(kw["sparsify_epochs"], kw["lr"], bs),
        "finetune": _phase(kw["finetune_epochs"], kw["finetune_lr"], bs),
    }
    cfg = build_config(FinetuneConfig, recipe, overrides)
    with Progress(enabled=not (kw["quiet"] or kw["as_json"]) and os.environ.get("RANK", "0") == "0") as progress:
        result = run_finetune(cfg, progress.on_event)
    _finish(result, kw["as_json"])


def _finish(result, as_json: bool) -> None:
    from .console import print_report

    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 speaks for all
    if as_json:
        click.echo(json.dumps(result.report, indent=2))
        return
    print_report(result.report)
    click.echo(f"checkpoint: {result.checkpoint}")
    if result.report_path is not None:
        click.echo(f"report:     {result.report_path}")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info(checkpoint: str, as_json: bool) -> None:
    """The report of any sslcompress checkpoint (layers kept, MACs, accuracy)."""
    from .console import print_report
    from .finetune.checkpoint import load_checkpoint
    from .finetune.pipeline import checkpoint_report

    ckpt = load_checkpoint(checkpoint)
    report = checkpoint_report(ckpt)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{checkpoint}: {ckpt.kind} {ckpt.model.name} ({ckpt.model.in_channels}x"
                   f"{ckpt.model.input_size[0]}x{ckpt.model.input_size[1]}, {ckpt.model.num_classes} classes)")
        print_report(report)


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
        click.option("--shape-lowering", type=click.Choice(["auto", "off", "on"]), default="auto", show_default=True,
                     help="Rewrite convs with irregular zero weight columns as im2col of the kept columns + "
                          "MatMul: auto where it times faster in ONNX Runtime (CPU, 1 thread), on always, off never."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _where(node: dict[str, Any]) -> str:
    return f"node {node['node']!r} ({node['op_type']}, output {node['value']!r})"


def _write_compact(result, out: str, report_path: str | None, force: bool, as_json: bool,
                   extra: dict[str, Any] | None = None) -> None:
    from .errors import VerificationError
    from .io import atomic_write_json
    from .surgery.export import save_onnx

    report = {**result.report, **(extra or {})}
    v = report["verification"]
    node = v.get("first_diverging_node")
    if not v["passed"] and not force:
        at = f", first at {_where(node)}" if node else ""
        raise VerificationError(
            f"the compact model differs from the uncut one by {v['max_abs']:.3g} (max |output| "
            f"{v['max_ref']:.3g}){at}; nothing written (--force writes it anyway)")
    save_onnx(result.model, out)
    if report_path:
        atomic_write_json(report, report_path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        from .console import print_surgery_report

        print_surgery_report(report)
        if v.get("real_images"):
            agree = v.get("real_top1_agreement")
            click.echo(f"real images: {v['real_images']} from {report.get('data')}"
                       + (f", top-1 agreement {agree:.2%}" if agree is not None else ""))
        if node:
            click.echo(f"first diverging {_where(node)}: max abs difference {node['max_abs']:.3g}")
        click.echo(f"compact model: {out}")


def _real_inputs(proto, data: str | None, limit: int):
    from .surgery.inputs import real_inputs

    return real_inputs(proto, data, limit=limit) if data else None


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Where the compact ONNX model goes.")
@_surgery_options
def surgery(model: str, out: str, data: str | None, data_limit: int, report_path: str | None, force: bool,
            shape_lowering: str, as_json: bool) -> None:
    """Delete exactly-zero channels from any ONNX model, verified against it in ONNX Runtime."""
    from .surgery.compress import compress
    from .surgery.export import load_onnx

    proto = load_onnx(model)
    result = compress(proto, inputs=_real_inputs(proto, data, data_limit), shape_lowering=shape_lowering)
    _write_compact(result, out, report_path, force, as_json, {"data": data} if data else None)


def _parse_input_shape(text: str) -> tuple[int, int, int]:
    """C,H,W (or CxHxW) as three positive ints; anything else is one clear error."""
    from .errors import ConfigError

    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise ConfigError(f"--input-shape wants three positive integers C,H,W such as 3,32,32, got {text!r}")
    return values  # type: ignore[return-value]


def _check_runs(model, shape: tuple[int, ...], given: str) -> None:
    """One forward pass at the override shape, so a misfit is one sentence, not an exporter trace."""
    import torch

    from .errors import ConfigError

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
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
           data: str | None, data_limit: int, report_path: str | None, force: bool, shape_lowering: str,
           as_json: bool) -> None:
    """Export a checkpoint to ONNX (eval mode, onnxsim), delete its zero channels, verify."""
    from .finetune.checkpoint import load_checkpoint
    from .flops import count
    from .surgery.compress import compress
    from .surgery.export import export_onnx, save_onnx

    override = _parse_input_shape(input_shape) if input_shape is not None else None
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build()
    shape = (1, *override) if override else ckpt.model.input_shape
    if override:
        _check_runs(model, shape, input_shape)
    exported = export_onnx(model, shape, opset=opset, dynamic_batch=dynamic_batch)
    result = compress(exported.model, inputs=_real_inputs(exported.model, data, data_limit),
                      shape_lowering=shape_lowering)
    # The checkpoint's own count of what its zero groups remove, beside what surgery removed.
    predicted = count(model, shape).macs_after
    extra = {"checkpoint": checkpoint, "input_shape": list(shape), "predicted_macs_after": predicted,
             "macs_after_matches_prediction": predicted == result.report["totals"]["macs_after"]}
    if data:
        extra["data"] = data
    if uncut:
        save_onnx(exported.model, uncut)
    _write_compact(result, out, report_path, force, as_json, extra)


def _int_list(text: str, flag: str, allow_all: bool = False) -> tuple[int, ...]:
    """'1,2' (and 'all' = the CPUs this process may use) as positive ints, in order, without repeats."""
    from .bench.paper import cpus
    from .errors import ConfigError

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
              help="Also write the three ONNX variants here (dense.onnx, unstructured.onnx, structured.onnx).")
@click.option("--no-pin", is_flag=True, help="Leave thread placement to the OS (default: the timing thread and "
                                           "ORT's workers on the same CPUs for every variant).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the input and the bootstrap.")
@click.option("--quiet", "-q", is_flag=True, help="No progress.")
def bench(target: str | None, dense: str | None, unstructured: str | None, structured: str | None,
          providers: tuple[str, ...], threads: str, batches: str | None, warmup: int, repeat: int | None,
          min_time: float | None, data: str | None, data_limit: int, layer_study: bool, paper_table: str | None,
          as_json: bool, out: str | None, markdown: str | None, plot: str | None, models_dir: str | None,
          no_pin: bool, seed: int, quiet: bool) -> None:
    """Time the dense, unstructured-sparse and structured-sparse model side by side in ONNX Runtime.

    RUN_DIR_OR_CHECKPOINT: a finetune run folder (sparse.pt, and pretrained.pt as the dense model when
    present), a checkpoint, or an ONNX model with exact zeros. Stock ONNX Runtime runs the unstructured
    model with dense kernels; the output says so.
    """
    from .bench.config import BenchConfig
    from .bench.plot import require_matplotlib
    from .bench.run import run_bench
    from .console import BenchProgress, print_bench
    from .io import atomic_write_bytes, atomic_write_json

    config = BenchConfig(
        target=target, dense=dense, unstructured=unstructured, structured=structured,
        providers=tuple(dict.fromkeys(p.strip().lower() for v in (providers or ("cpu",)) for p in v.split(",")
                                      if p.strip())),
        threads=_int_list(threads, "--threads", allow_all=True),
        batches=_int_list(batches, "--batch") if batches is not None else None,
        warmup=warmup, repeat=repeat, min_time=min_time, data=data, data_limit=data_limit, layers=layer_study,
        paper_table=paper_table, models_dir=models_dir, pin=not no_pin, seed=seed)
    if plot:
        require_matplotlib()
    with BenchProgress(enabled=not (quiet or as_json)) as progress:
        result = run_bench(config, progress.on_event)
    if out:
        atomic_write_json(result.to_dict(), out)
    if markdown:
        from .bench.report import render_markdown

        atomic_write_bytes(render_markdown(result).encode(), markdown)
    if plot:
        from .bench.plot import plot as write_plot

        write_plot(result, plot)
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
@click.option("--model", type=click.Choice(["lenet5", "resnet20"]), default="lenet5", show_default=True)
@click.option("--threads", default="1", show_default=True, help="Thread counts to bench, e.g. 1,2.")
@click.option("--quick", is_flag=True, help="A smoke-test size: one epoch per phase, few images, 3 rounds.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(out: str, model: str, threads: str, quick: bool, quiet: bool) -> None:
    """All three stages on the bundled digits: finetune, export (surgery), bench on the CPU."""
    from .bench.plot import plot
    from .bench.report import render_markdown
    from .bench.run import plot_available, run_bench
    from .console import BenchProgress, Progress, print_bench, print_report, print_surgery_report
    from .demo import DemoPaths, bench_config, export_stage, finetune_config
    from .finetune.pipeline import run_finetune
    from .io import atomic_write_bytes, atomic_write_json

    paths = DemoPaths(Path(out))
    click.echo(f"1/3 finetune: {model} on digits (baseline first), SSL, fine-tune -> {paths.sparse}")
    with Progress(enabled=not quiet) as progress:
        trained = run_finetune(finetune_config(paths, model, quick), progress.on_event)
    print_report(trained.report)
    click.echo(f"2/3 export: ONNX, surgery, verification in ONNX Runtime -> {paths.compact}")
    cut = export_stage(paths)
    print_surgery_report(cut.report)
    click.echo("3/3 bench: dense vs unstructured vs structured in ONNX Runtime (CPU)")
    with BenchProgress(enabled=not quiet) as progress:
        result = run_bench(bench_config(paths, quick, _int_list(threads, "--threads", allow_all=True)),
                           progress.on_event)
    atomic_write_json(result.to_dict(), paths.bench_json)
    atomic_write_bytes(render_markdown(result).encode(), paths.bench_markdown)
    written = [("pretrained", paths.pretrained), ("sparse", paths.sparse), ("uncut", paths.uncut),
               ("compact", paths.compact), ("surgery", paths.surgery_report), ("bench", paths.bench_json),
               ("markdown", paths.bench_markdown)]
    if plot_available():
        plot(result, paths.bench_plot)
        written.append(("plot", paths.bench_plot))
    print_bench(result)
    for what, path in written:
        click.echo(f"{what + ':':12} {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
