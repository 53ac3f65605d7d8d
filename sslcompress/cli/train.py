"""pretrain, finetune, info: stage 1."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from ..errors import SSLCompressError
from . import EPILOG_DATA, align_value, main


def _run_options(f):
    opts = [
        click.option("--model", default=None,
                     help="Built-in name (lenet5, mlp, convnet, resnet20/32/56, vit_tiny, vit_small, convnext_cifar, alexnet, "
                          "vgg16, vgg16_bn, resnet18, resnet50), torchvision:NAME, path/file.py:factory or pkg.module:factory. "
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
    from ..config import read_recipe

    return read_recipe(path) if path else None


def _check_weights_not_overwritten(cfg, written: tuple[str, ...]) -> None:
    """--weights must not be a file this run writes into --out (it would replace the model it started from)."""
    from ..io import check_distinct_paths

    out = Path(cfg.run.out)
    check_distinct_paths([(f"--out ({name})", str(out / name)) for name in written], [("--weights", cfg.run.weights)])


@main.command()
@_run_options
@click.option("--epochs", default=None, type=click.IntRange(min=0), help="Training epochs (default 10).")
@click.option("--lr", default=None, type=float, help="Learning rate (default 0.02, cosine schedule).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last finished epoch.")
def pretrain(**kw: Any) -> None:
    """Train a dense baseline; writes RUN/pretrained.pt."""
    from ..config import PretrainConfig, build_config
    from ..console import Progress
    from ..finetune.pipeline import run_pretrain

    recipe = _recipe(kw["recipe"])
    run = _run_overrides(kw)
    run["out"] = run["out"] or (recipe or {}).get("out") or _default_out(kw["model"] or (recipe or {}).get("model"),
                                                                          kw["data"] or (recipe or {}).get("data"))
    cfg = build_config(PretrainConfig, _flatten_recipe(recipe, "train"),
                       {**run, "train": _phase(kw["epochs"], kw["lr"], kw["batch_size"]),
                        "resume": kw["resume"] or None})
    from ..finetune.pipeline import PRETRAINED, STATE

    _check_weights_not_overwritten(cfg, (PRETRAINED, STATE))
    with Progress(enabled=not (kw["quiet"] or kw["as_json"]) and os.environ.get("RANK", "0") == "0") as progress:
        result = run_pretrain(cfg, progress.on_event)
    _finish(result, kw["as_json"])


def _flatten_recipe(recipe: dict[str, Any] | None, phase_key: str) -> dict[str, Any] | None:
    """A pretrain recipe may hold its training options at the top level or under [train]/[pretrain]."""
    if recipe is None:
        return None
    from dataclasses import fields

    from ..config import RunOptions, TrainOptions

    run_keys = {f.name for f in fields(RunOptions)}
    train_keys = {f.name for f in fields(TrainOptions)}
    out: dict[str, Any] = {k: v for k, v in recipe.items() if k in run_keys}
    train = dict(recipe.get("pretrain", {}) if phase_key == "train" else {})
    train.update(recipe.get("train", {}))
    train.update({k: v for k, v in recipe.items() if k in train_keys})
    if "resume" in recipe:
        out["resume"] = recipe["resume"]
    unknown = set(recipe) - run_keys - train_keys - {"train", "pretrain", "resume"}
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
              help="Comma list of filter, channel, shape, depth, kernel_row, kernel_col, neuron, head, or 'all' "
                   "(default filter,channel).")
@click.option("--lambda", "lambdas", multiple=True, metavar="KIND=VALUE",
              help="Group Lasso strength of one structure (repeatable), e.g. --lambda shape=0.2.")
@click.option("--strength", default=None, type=float, help="Strength of every structure without its own --lambda.")
@click.option("--method", type=click.Choice(["ssl", "l1"]), default=None,
              help="ssl (structured, default) or l1 (non-structured, for comparison).")
@click.option("--solver", type=click.Choice(["proximal", "subgradient"]), default=None,
              help="proximal group soft-thresholding (default, exact zeros) or the paper's subgradient + threshold.")
@click.option("--threshold", default=None, type=float, help="Zeroing threshold of the subgradient solver (1e-4).")
@click.option("--weighting", type=click.Choice(["none", "sqrt", "macs", "latency"]), default=None,
              help="Group weights: none, sqrt(group size), the MACs a group costs, or the latency removing it "
                   "saves by the --latency-* table (default latency with --target-latency, else none).")
@click.option("--target-flops", default=None, type=float,
              help="Adjust lambda until at most this fraction of the dense MACs remains, e.g. 0.2; the run "
                   "lands within one point below it.")
@click.option("--target-params", default=None, type=float,
              help="The same for the parameters: at most this fraction remains (with --target-flops, both).")
@click.option("--target-latency", default=None, type=float, metavar="MS",
              help="Adjust lambda until the model runs in at most MS milliseconds, as the latency table of "
                   "`sslcompress profile` predicts it for the --latency-* session (profile the model first).")
@click.option("--latency-provider", type=click.Choice(["cpu", "cuda"]), default=None,
              help="ONNX Runtime provider the latency table was measured on (default cpu).")
@click.option("--latency-threads", default=None, type=click.IntRange(min=1),
              help="Intra-op threads of the latency table (default 1).")
@click.option("--latency-batch", default=None, type=click.IntRange(min=1),
              help="Batch of the latency table (default 1).")
@click.option("--latency-table", default=None, type=click.Path(dir_okay=False),
              help="The latency table file (default: the cache file of this machine and session).")
@click.option("--align", default=None, callback=lambda _c, _p, v: align_value(v), metavar="N|auto",
              help="Keep every prunable width (channels a layer writes) a multiple of N; pinned widths and "
                   "widths below N stay as they are. auto: the channel step the latency table of the "
                   "--latency-* session shows (profile the model first).")
@click.option("--min-keep", default=None, type=float, metavar="FRACTION",
              help="Each width that carries the network (a residual trunk, a layer of a plain stack) keeps at "
                   "least this fraction of its channels (default 0.1; 0: as few as one). "
                   "Widths a residual branch bypasses may still empty.")
@click.option("--importance", type=click.Choice(["norm", "taylor"]), default=None,
              help="How the ranking that lands a budget scores each group: taylor (default; the loss its "
                   "removal costs to first order, from the recent steps' gradients, per unit of what it saves, "
                   "one scale for the whole network) or norm (its L2 norm over its width's mean).")
@click.option("--thin/--no-thin", "thin", default=None,
              help="Fine-tune the thinned model: zero channels sliced out of the torch model after sparsify "
                   "(the same function, faster steps; default on).")
@click.option("--pace/--no-pace", "pace", default=None,
              help="With a budget, zero the weakest groups at each check where lambda lags the budget's "
                   "schedule, reaching the budget step by step during sparsify (default on); off: lambda alone "
                   "until the end of sparsify, then one cut.")
@click.option("--budget-every", default=None, type=int, metavar="STEPS",
              help="Optimizer steps between budget checks (default 25, at least four checks an epoch).")
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
    from ..config import FinetuneConfig, build_config
    from ..console import Progress
    from ..finetune.pipeline import run_finetune

    recipe = _recipe(kw["recipe"]) or {}
    run = _run_overrides(kw)
    run["out"] = run["out"] or recipe.get("out") or _default_out(kw["model"] or recipe.get("model"),
                                                                  kw["data"] or recipe.get("data"))
    bs = kw["batch_size"]
    overrides = {
        **run,
        "structures": kw["structures"], "lambdas": _parse_lambdas(kw["lambdas"]), "strength": kw["strength"],
        "method": kw["method"], "solver": kw["solver"], "threshold": kw["threshold"],
        "weighting": kw["weighting"], "target_flops": kw["target_flops"], "target_params": kw["target_params"],
        "align": kw["align"], "min_keep": kw["min_keep"], "importance": kw["importance"],
        "budget_every": kw["budget_every"], "thin": kw["thin"], "pace": kw["pace"],
        "target_latency": kw["target_latency"], "latency_provider": kw["latency_provider"],
        "latency_threads": kw["latency_threads"], "latency_batch": kw["latency_batch"],
        "latency_table": kw["latency_table"],
        "resume": kw["resume"] or None,
        "pretrain": _phase(kw["pretrain_epochs"], None, bs),
        "sparsify": _phase(kw["sparsify_epochs"], kw["lr"], bs),
        "finetune": _phase(kw["finetune_epochs"], kw["finetune_lr"], bs),
    }
    cfg = build_config(FinetuneConfig, recipe, overrides)
    from ..finetune.pipeline import PRETRAINED, REPORT, SPARSE, STATE

    _check_weights_not_overwritten(cfg, (PRETRAINED, SPARSE, REPORT, STATE))
    with Progress(enabled=not (kw["quiet"] or kw["as_json"]) and os.environ.get("RANK", "0") == "0") as progress:
        result = run_finetune(cfg, progress.on_event)
    _finish(result, kw["as_json"])


def _finish(result, as_json: bool) -> None:
    from ..console import print_report

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
    from ..console import print_report
    from ..finetune.checkpoint import load_checkpoint
    from ..finetune.pipeline import checkpoint_report

    ckpt = load_checkpoint(checkpoint)
    report = checkpoint_report(ckpt)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{checkpoint}: {ckpt.kind} {ckpt.model.name} ({ckpt.model.in_channels}x"
                   f"{ckpt.model.input_size[0]}x{ckpt.model.input_size[1]}, {ckpt.model.num_classes} classes)")
        print_report(report)


