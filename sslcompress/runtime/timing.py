"""Interleaved timing of several callables, and the statistics a bench reports: the package's one harness.

Round by round, each variant runs one sample in turn, the order rotated every round so that each takes
each slot equally often: machine drift (a neighbour's job, a clock change) then falls on all variants
alike, and the ratio of their medians cancels it. A sample is the mean time per call of enough
back-to-back calls to last `sample_time` (one call for anything slower); median, p90 and quartiles are
over the samples, one per round. The speed-up's confidence interval resamples whole rounds (the pair of
samples a round gave), so it keeps that pairing.

`rounds` is the loop alone, for callers that calibrate their samples themselves (the per-layer GEMM study
synchronises a device around each); `interleaved` calibrates ORT or any other callables and runs it.
This module imports numpy alone.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ..errors import ConfigError

MIN_ROUNDS = 5  # with --min-time: rounds below this many give no honest quartiles
MAX_CALLS = 10_000
CI_LEVEL = 0.95
BOOTSTRAP = 2000

RoundProgress = Callable[[int, int | None], None]  # (rounds done, rounds planned or None under min_time)


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), without numpy."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bootstrap_ratio(dense: Sequence[float], other: Sequence[float], *, seed: int = 0, n: int = BOOTSTRAP,
                    level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of median(dense) / median(other), resampling rounds in pairs.

    The interval is widened to hold the point estimate where the percentiles miss it (possible with a few
    rounds, whose resampled medians take few values).
    """
    d, o = np.asarray(dense, dtype=float), np.asarray(other, dtype=float)
    if d.shape != o.shape or d.size == 0:
        raise ConfigError("bootstrap needs two equally long, non-empty series of paired samples")
    point = float(np.median(d) / np.median(o))
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n, d.size))
    ratios = np.median(d[idx], axis=1) / np.median(o[idx], axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = (float(v) for v in np.quantile(ratios, [alpha, 1 - alpha]))
    return min(lo, point), max(hi, point)


@dataclass(frozen=True)
class Timing:
    """One variant at one (provider, threads, batch): every sample, and its speed-up over dense."""

    variant: str
    provider: str
    threads: int
    batch: int
    calls_per_sample: int
    samples_s: tuple[float, ...]  # seconds per call, one sample per round, in round order
    speedup: float  # median(dense samples) / median(these samples)
    speedup_ci: tuple[float, float]  # CI_LEVEL bootstrap interval of that ratio

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def p90_s(self) -> float:
        return quantile(self.samples_s, 0.9)

    @property
    def q1_s(self) -> float:
        return quantile(self.samples_s, 0.25)

    @property
    def q3_s(self) -> float:
        return quantile(self.samples_s, 0.75)

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    @property
    def min_s(self) -> float:
        return min(self.samples_s)

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch / self.median_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median_s=self.median_s, p90_s=self.p90_s, q1_s=self.q1_s, q3_s=self.q3_s, iqr_s=self.iqr_s,
                 min_s=self.min_s, throughput=self.throughput)
        d["speedup_ci"] = list(self.speedup_ci)
        d["samples_s"] = list(self.samples_s)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Timing:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["samples_s"] = tuple(float(x) for x in kw["samples_s"])
        kw["speedup_ci"] = tuple(float(x) for x in kw["speedup_ci"])
        return cls(**kw)


def _block(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def calibrate(fn: Callable[[], Any], warmup: int, sample_time: float) -> int:
    """Untimed warm-up calls, then the calls per sample that make it last about sample_time."""
    for _ in range(warmup):
        fn()
    once = min(_block(fn, 1) for _ in range(3))
    return max(1, min(MAX_CALLS, math.ceil(sample_time / max(once, 1e-7))))


def rounds(samplers: Mapping[str, Callable[[], float]], *, min_rounds: int, min_time: float = 0.0,
           progress: RoundProgress | None = None, planned: int | None = None) -> dict[str, tuple[float, ...]]:
    """{name: samples}: rounds in rotating order, at least `min_rounds` and on until `min_time` seconds.

    Each sampler takes one sample and returns it (seconds per call). The garbage collector is off while the
    rounds run: a collection inside one variant's sample would be charged to it alone.
    """
    names = list(samplers)
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        start, r = time.perf_counter(), 0
        while r < min_rounds or time.perf_counter() - start < min_time:
            k = r % len(names)
            for n in (*names[k:], *names[:k]):
                samples[n].append(samplers[n]())
            r += 1
            if progress is not None:
                progress(r, planned)
    finally:
        if gc_was:
            gc.enable()
    return {n: tuple(samples[n]) for n in names}


def interleaved(runs: Mapping[str, Callable[[], Any]], *, repeat: int | None = 20, min_time: float | None = None,
                warmup: int = 5, sample_time: float = 0.005, progress: RoundProgress | None = None
                ) -> dict[str, tuple[int, tuple[float, ...]]]:
    """{name: (calls per sample, samples)}: `repeat` rounds, or rounds until `min_time` seconds have passed."""
    if (repeat is None) == (min_time is None):
        raise ConfigError("give a number of rounds (repeat) or a minimum time (min_time), one of the two")
    if (repeat is not None and repeat < 1) or (min_time is not None and min_time <= 0) or warmup < 0 \
            or sample_time <= 0:
        raise ConfigError("repeat >= 1, min_time > 0, warmup >= 0 and sample_time > 0 are required")
    calls = {n: calibrate(fn, warmup, sample_time) for n, fn in runs.items()}
    samplers = {n: (lambda fn=fn, c=calls[n]: _block(fn, c)) for n, fn in runs.items()}
    raw = rounds(samplers, min_rounds=repeat if repeat is not None else MIN_ROUNDS, min_time=min_time or 0.0,
                 progress=progress, planned=repeat)
    return {n: (calls[n], raw[n]) for n in runs}


def timings(raw: Mapping[str, tuple[int, tuple[float, ...]]], *, baseline: str, provider: str, threads: int,
            batch: int, seed: int = 0) -> list[Timing]:
    """Timing records with speed-ups over `baseline`, computed from the recorded samples."""
    base = raw[baseline][1]
    out = []
    for name, (calls, samples) in raw.items():
        if name == baseline:
            ratio, ci = 1.0, (1.0, 1.0)
        else:
            ratio = statistics.median(base) / statistics.median(samples)
            ci = bootstrap_ratio(base, samples, seed=seed)
        out.append(Timing(name, provider, threads, batch, calls, tuple(samples), ratio, ci))
    return out
