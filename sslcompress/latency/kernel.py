"""An op's compute time on the CPU, read from ONNX Runtime's profiler: what the op costs inside a model.

Timed alone by the wall clock, one op pays what the whole model pays once, or never, for each of its ops: the
session call (about 20-30 us through Python on an AVX2 EPYC), the copy of its output to the caller and, for a
conv ORT runs in its blocked layout (NCHWc), the reorder of its input into blocks and of its output back. A
ResNet-20 3x3 conv of 32 -> 32 channels on 16x16 computed in 56 us of the 92 us of its session call; in the
whole graph a chain of blocked convs passes blocks from one to the next and pays neither reorder. Those costs
do not shrink with the widths as the compute does, so a table of wall times put them in every narrowed
layer's figure and predicted narrow models high (up to 42% on ResNet-20 at batch 1).

The profiler times each node of a run (microsecond resolution). An op's figure here is the time of its
compute nodes in each run (the conv, or the Gemm / MatMul and Add), the layout reorders left out, averaged
over the middle half of the runs (a mean, not a median: a run of a few microseconds is read in whole
microseconds, and the mean of many readings resolves below one), less the profiler's own cost per node (what
it reads for a Relu of one element, `profiler_floor_ms`): 4-8 us, a third of a narrow ResNet-20 conv's
reading at batch 1.

The reorders are read too, apart (`kernel_parts`): a whole graph pays a ReorderInput or ReorderOutput only where
a blocked conv meets an op that reads the plain layout (layout.py says where), and then it pays what the op
alone paid around its conv.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError

# The layout changes ORT puts around a blocked conv (com.microsoft.nchwc); a whole graph pays them only
# where blocked and plain ops meet, which the whole-model calibration measures (predict.py).
REORDERS = frozenset({"ReorderInput", "ReorderOutput"})
MIN_RUNS = 8  # a large op (tens of ms) is read this many times, as a session call was timed 5 + 3 warm-up times
MAX_RUNS = 4000


@dataclass(frozen=True)
class KernelTimes:
    """Mean ms per run of a model's compute nodes, and of its ReorderInput and ReorderOutput nodes."""

    compute: float
    reorder_in: float = 0.0
    reorder_out: float = 0.0


def kernel_ms(model, x_shape: tuple[int, ...], threads: int, seconds: float, warmup: int = 3) -> float:
    """Mean ms per run of the model's compute nodes (the middle half of the runs), over about `seconds` of
    runs on a random input of `x_shape`, on the CPU with `threads` intra-op threads."""
    return kernel_parts(model, x_shape, threads, seconds, warmup).compute


def kernel_parts(model, x_shape: tuple[int, ...], threads: int, seconds: float, warmup: int = 3) -> KernelTimes:
    """kernel_ms, and beside it the mean ms per run of the model's ReorderInput and ReorderOutput nodes (the
    middle half of the runs each; 0 where ORT put none)."""
    from ..runtime.sessions import create_session

    folder = Path(tempfile.mkdtemp(prefix="sslcompress-profile-"))
    try:
        sess = create_session(model, threads=threads, profile_prefix=str(folder / "op"))
        name = sess.get_inputs()[0].name
        feed = {name: np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
        for _ in range(warmup):
            sess.run(None, feed)
        t0 = time.perf_counter()
        sess.run(None, feed)
        once = max(time.perf_counter() - t0, 1e-6)
        runs = max(MIN_RUNS, min(MAX_RUNS, math.ceil(seconds / once)))
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    per_run = nodes_per_run(events)[warmup + 1:]
    if not per_run:
        raise ConfigError("ONNX Runtime's profile of an op held no node timings")
    return KernelTimes(*(trimmed_mean(list(part)) / 1e3 for part in zip(*per_run, strict=True)))


def profiler_floor_ms(threads: int, seconds: float = 0.05, repeats: int = 3) -> float:
    """What the profiler reads for a node that does nearly nothing (a Relu of one element): its own cost per
    node, about 4-8 us on an AVX2 EPYC, which every op's figure holds and no whole model pays. The median of
    `repeats` readings."""
    from .ops import relu_model

    model, x_shape = relu_model(1)
    readings = sorted(kernel_ms(model, x_shape, threads, seconds) for _ in range(repeats))
    return readings[len(readings) // 2]


def net_ms(kernel: float, floor: float) -> float:
    """An op's figure less the profiler's floor, never below a tenth of what was read (a tiny op read at the
    floor's noise would otherwise cost nothing)."""
    return max(kernel - floor, 0.1 * kernel)


def nodes_per_run(events: list[dict]) -> list[tuple[float, float, float]]:
    """Microseconds of (compute nodes, ReorderInput nodes, ReorderOutput nodes) per run, in run order. A run's
    node events come before its own "model_run" event in the profile (each is written when it ends)."""
    totals: list[tuple[float, float, float]] = []
    current = [0.0, 0.0, 0.0]
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            totals.append((current[0], current[1], current[2]))
            current = [0.0, 0.0, 0.0]
        elif e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name")
            current[0 if op not in REORDERS else 1 if op == "ReorderInput" else 2] += float(e.get("dur", 0))
    return totals


def compute_per_run(events: list[dict]) -> list[float]:
    """Microseconds of compute nodes (all but layout reorders) per run, in run order."""
    return [compute for compute, _, _ in nodes_per_run(events)]


def trimmed_mean(values: list[float]) -> float:
    """The mean of the middle half (the interquartile mean): robust to the odd slow run, finer than the
    median of readings in whole microseconds."""
    v = sorted(values)
    q = len(v) // 4
    middle = v[q: len(v) - q] or v
    return float(sum(middle) / len(middle))
