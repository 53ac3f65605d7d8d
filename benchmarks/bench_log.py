"""Progress lines and argument helpers shared by the training benchmarks (run beside them, not installed)."""

from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    """One time-stamped line on stderr, so a script's tables on stdout stay clean."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def epoch_line(e) -> str:
    """A finished epoch of a training run in one line: loss, test accuracy and, while sparsifying, the budget."""
    parts = [
        f"{e.phase} epoch {e.epoch + 1}/{e.epochs}",
        f"train loss {e.loss:.4f}",
        f"test acc {e.accuracy:.4f}",
    ]
    if e.macs_fraction is not None:
        parts.append(f"MAC fraction {e.macs_fraction:.4f}")
    if e.zero_groups is not None:
        parts.append(f"zero groups {e.zero_groups:.3f}")
    if e.lambdas:
        parts.append("lambdas " + ", ".join(f"{k}={v:.4g}" for k, v in e.lambdas.items()))
    return " | ".join(parts)


def on_event(e) -> None:
    """run_pretrain/run_finetune's callback: every info message and one line per finished epoch, no per-step noise."""
    if e.phase == "info":
        log(f"info: {e.message}")
    elif e.end_of_epoch:
        log(epoch_line(e))


def csv(text: str, kind=str) -> list:
    """A comma list of the command line, blanks dropped."""
    return [kind(x.strip()) for x in text.split(",") if x.strip()]
