"""The paper's Table 4 study run from the library: AlexNet's conv GEMMs with its sparsities, ours beside theirs.

Row 1 (l1): Table 4's unstructured sparsity placed by magnitude on a random weight of each AlexNet conv
shape, CSR sparse x dense (torch, and scipy on CPU) against the dense GEMM. Row 2 (SSL): its zero-row
and zero-column fractions, the compact dense GEMM against the dense one. Speed-ups are dense median /
contender median per layer, averaged over the five layers as the paper does (`benchmarks/paper_table4.py`
is the script form with a results file).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from . import layers as L
from .table4 import TABLE4, paper_mean, table4_layers

MODELS = ("alexnet",)
StudyProgress = Callable[[str], None]


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class PaperRun:
    """Both rows of Table 4 at one thread count (CPU)."""

    threads: int
    backend: str
    l1: tuple[L.LayerTiming, ...]
    ssl: tuple[L.LayerTiming, ...]

    def summary(self) -> dict[str, float]:
        csrs = [c for c in (L.CSR, L.SCIPY_CSR) if any(x.contender == c for x in self.l1[0].timings)]
        s = {"l1_torch_csr": L.mean_speedup(self.l1, L.CSR), "l1_best_csr": L.mean_speedup(self.l1, csrs),
             "ssl": L.mean_speedup(self.ssl, L.COMPACT),
             "ssl_ideal": statistics.fmean(t.M * t.K / max(1, t.get(L.COMPACT).M * t.get(L.COMPACT).K)
                                           for t in self.ssl),
             "paper_l1": paper_mean("cpu_l1"), "paper_ssl": paper_mean("cpu_ssl")}
        if L.SCIPY_CSR in csrs:
            s["l1_scipy_csr"] = L.mean_speedup(self.l1, L.SCIPY_CSR)
        s["ssl_over_l1_torch_csr"] = s["ssl"] / s["l1_torch_csr"]
        s["ssl_over_l1_best_csr"] = s["ssl"] / s["l1_best_csr"]
        s["paper_ssl_over_l1"] = s["paper_ssl"] / s["paper_l1"]
        return s

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "backend": self.backend, "l1": [t.to_dict() for t in self.l1],
                "ssl": [t.to_dict() for t in self.ssl], "summary": self.summary()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PaperRun:
        return cls(d["threads"], d["backend"], tuple(L.LayerTiming.from_dict(t) for t in d["l1"]),
                   tuple(L.LayerTiming.from_dict(t) for t in d["ssl"]))


@dataclass(frozen=True)
class PaperTable:
    model: str
    shapes: str
    batch: int
    repeat: int
    sample_time: float
    runs: tuple[PaperRun, ...]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["runs"] = [r.to_dict() for r in self.runs]
        d["paper"] = [vars(r) for r in TABLE4]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PaperTable:
        kw = {f.name: d[f.name] for f in fields(cls)}
        kw["runs"] = tuple(PaperRun.from_dict(r) for r in d["runs"])
        return cls(**kw)


def paper_table(model: str = "alexnet", *, threads: Sequence[int] | None = None, repeat: int = 15,
                warmup: int = 2, sample_time: float = 0.01, batch: int = 1, shapes: str = "torchvision",
                seed: int = 0, say: StudyProgress | None = None) -> PaperTable:
    """Table 4 on this CPU at each thread count (default: 1 and all cores)."""
    from ..errors import ConfigError

    if model not in MODELS:
        raise ConfigError(f"--paper-table knows {', '.join(MODELS)}, not {model!r}")
    threads = list(dict.fromkeys(threads or (1, cpus())))
    l1_layers, ssl_layers = table4_layers(shapes, batch, seed)
    l1_contenders = tuple(c for c in L.available_contenders("cpu") if c != L.COMPACT)
    opts = dict(device="cpu", repeat=repeat, warmup=warmup, sample_time=sample_time, seed=seed)
    runs = []
    for t in threads:
        def progress(i: int, n: int, timing: L.LayerTiming, row: str = "l1", t: int = t) -> None:
            if say is not None:
                say(f"Table 4, {t} thread(s), {row} row: {timing.name} ({i}/{n})")

        l1 = L.study(l1_layers, l1_contenders, threads=t, progress=progress, **opts)
        ssl = L.study(ssl_layers, (L.DENSE, L.COMPACT), threads=t,
                      progress=lambda i, n, x, t=t: progress(i, n, x, "SSL", t), **opts)
        runs.append(PaperRun(t, l1[0].backend, tuple(l1), tuple(ssl)))
    return PaperTable(model, shapes, batch, repeat, sample_time, tuple(runs))
