"""A PNG chart of a bench result (needs matplotlib: the `plot` extra)."""

from __future__ import annotations

import io
from pathlib import Path

from ..errors import SSLCompressError
from ..io import atomic_write_bytes
from . import layers as L
from .report import short_name
from .results import BenchResult

PLOT_INSTALL = "pip install sslcompress[plot]"
COLORS = {"dense": "#7f7f7f", "unstructured": "#ff7f0e", "structured": "#1f77b4", "dense-int8": "#bcbcbc",
          "structured-int8": "#2ca02c"}
# Variants added with --variant, in the order they come: colours none of the built ones wears.
MORE_COLORS = ("#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def variant_colors(names: list[str]) -> dict[str, str]:
    """A colour per variant: the built ones' own, then the added ones' in turn (cycling past six)."""
    added = [n for n in names if n not in COLORS]
    return {**{n: COLORS[n] for n in names if n in COLORS},
            **{n: MORE_COLORS[i % len(MORE_COLORS)] for i, n in enumerate(added)}}


class PlotUnavailableError(SSLCompressError):
    """matplotlib is not installed."""


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib() -> None:
    if not plot_available():
        raise PlotUnavailableError(f"--plot needs matplotlib, which is not installed: {PLOT_INSTALL}")


def plot(result: BenchResult, path: str | Path) -> None:
    """Latency per variant and batch (one panel per provider and thread count; bars at the median, whiskers
    from the first to the third quartile); per-layer speed-ups when the result has them."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((p, t) for p, t, _ in result.settings()))
    layer_groups = list(dict.fromkeys((x.device, x.threads) for x in result.layers))
    panels = len(groups) + len(layer_groups) + (len(result.paper.runs) if result.paper else 0)
    if panels == 0:
        raise SSLCompressError("nothing to plot: the result holds no timings")
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.2 * panels), squeeze=False)
    ax_iter = iter(axes[:, 0])
    names = result.variant_order()
    colors = variant_colors(list(names))
    for provider, threads in groups:
        ax = next(ax_iter)
        batches = [b for p, t, b in result.settings() if (p, t) == (provider, threads)]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ts = [result.timing(name, provider, threads, b) for b in batches]
            med = [t.median_s * 1e3 for t in ts]
            err = [[m - t.q1_s * 1e3 for m, t in zip(med, ts)], [t.q3_s * 1e3 - m for m, t in zip(med, ts)]]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(batches))]
            bars = ax.bar(xs, med, width, yerr=err, capsize=3, label=name, color=colors[name])
            for bar, t in zip(bars, ts):
                if name != "dense":  # above the whisker
                    ax.annotate(f"{t.speedup:.2f}x", (bar.get_x() + bar.get_width() / 2, t.q3_s * 1e3),
                                xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel("ms per run (median)")
        ax.set_title(f"ONNX Runtime {provider}, {threads} thread(s)")
        ax.legend(fontsize=8)
    for device, threads in layer_groups:
        ax = next(ax_iter)
        rows = [x for x in result.layers if (x.device, x.threads) == (device, threads)]
        contenders = [c for c in (L.CSR, L.SCIPY_CSR, L.COMPACT) if any(x.speedup(c) is not None for x in rows)]
        width = 0.8 / max(1, len(contenders))
        for i, c in enumerate(contenders):
            xs = [j + (i - (len(contenders) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [x.speedup(c) or 0.0 for x in rows], width, label=c)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), [short_name(x.name) for x in rows], rotation=45,
                      ha="right", fontsize=7)
        ax.set_ylabel("speed-up over dense GEMM")
        ax.set_title(f"per-layer GEMM study: {device}" + ("" if threads is None else f", {threads} thread(s)"))
        ax.legend(fontsize=8)
    if result.paper:
        from .table4 import TABLE4

        for run in result.paper.runs:
            ax = next(ax_iter)
            series = {"ours l1 (CSR)": [t.speedup(L.CSR) for t in run.l1], "paper l1": [p.cpu_l1 for p in TABLE4],
                      "ours SSL (compact)": [t.speedup(L.COMPACT) for t in run.ssl],
                      "paper SSL": [p.cpu_ssl for p in TABLE4]}
            width = 0.8 / len(series)
            for i, (label, ys) in enumerate(series.items()):
                ax.bar([j + (i - 1.5) * width for j in range(len(ys))], ys, width, label=label)
            ax.set_xticks(range(len(TABLE4)), [p.layer for p in TABLE4])
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel("speed-up over dense GEMM")
            ax.set_title(f"Table 4, AlexNet: {run.threads} thread(s), CPU")
            ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=110, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(buffer.getvalue(), path)
