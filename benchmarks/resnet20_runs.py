"""What the CIFAR ResNet-20 SSL comparisons (latency_vs_macs.py, depth_vs_width.py) share: the options of their
training runs, those options made ready (the quick settings, the data spec, torch's threads), reading a finished
run back instead of training it again, and writing the results."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from bench_log import log
from paper_cifar10 import DEFAULT_DATA, REPO

from sslcompress.io import atomic_write_bytes, atomic_write_json

PRETRAINED = REPO / "benchmarks" / "out" / "cifar_resnet20_b" / "pretrained.pt"


def add_training_args(ap: argparse.ArgumentParser) -> None:
    """The pretrained checkpoint, the data, the SSL phases and the timing rounds, with the defaults both use."""
    ap.add_argument("--pretrained", default=str(PRETRAINED))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target-flops", type=float, default=0.5)
    ap.add_argument("--strength", type=float, default=0.005)
    ap.add_argument("--sparsify-epochs", type=int, default=1)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batches", default="1,8")


def ready(args: argparse.Namespace) -> str | None:
    """Finish the parsed options in place; the error to print where the pretrained checkpoint is missing."""
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.quick:
        args.limit_train, args.limit_test = args.limit_train or 2000, args.limit_test or 1000
        args.sparsify_epochs, args.finetune_epochs, args.rounds = 1, 1, 5
    if not Path(args.pretrained).is_file():
        return f"no pretrained checkpoint at {args.pretrained}"
    torch.set_num_threads(args.threads)
    args.data_spec = f"cifar10:{Path(args.data).resolve()}"
    return None


def _run_files(folder: Path) -> tuple[Path, Path, Path, Path]:
    return folder / "report.json", folder / "surgery.json", folder / "compact.onnx", folder / "settings.json"


def as_recorded(key: dict) -> dict:
    """A run's settings as they read back from its record (tuples become lists)."""
    return json.loads(json.dumps(key))


def finished_settings(folder: Path) -> dict | None:
    """The settings a finished run in `folder` was recorded under; None where no finished run is there."""
    done = _run_files(folder)
    return json.loads(done[3].read_text())["settings"] if all(p.is_file() for p in done) else None


def reuse_or_train(folder: Path, key: dict, reuse: bool, train: Callable[[], tuple[dict, float, dict]]
                   ) -> tuple[dict, float, dict]:
    """(report, training seconds, surgery report) of one SSL run, exported and cut into `folder`: read back where
    `reuse` finds a finished run there recorded under the same `key`, else `train()`'s, then recorded under it."""
    done = _run_files(folder)
    key = as_recorded(key)
    if reuse and finished_settings(folder) == key:
        log(f"reusing the finished run in {folder}")
        kept = json.loads(done[3].read_text())
        return json.loads(done[0].read_text()), kept["train_s"], json.loads(done[1].read_text())
    report, secs, surgery = train()
    atomic_write_json({"settings": key, "train_s": secs}, done[3])
    return report, secs, surgery


def write_results(args: argparse.Namespace, doc: dict, render_md: Callable[[dict], str]) -> str:
    """The run's record as benchmarks/results/NAME.json and its table as NAME.md (benchmarks/out/NAME_quick.* for a
    smoke run); returns the table."""
    results = REPO / "benchmarks" / ("out" if args.quick else "results")
    path = results / f"{args.name}{'_quick' if args.quick else ''}.json"
    md = render_md(doc)
    atomic_write_json(doc, path)
    atomic_write_bytes(md.encode(), path.with_suffix(".md"))
    return md
