"""A bench result as tables of strings, and as Markdown; the terminal renders the same tables."""

from __future__ import annotations

from dataclasses import dataclass

from . import layers as L
from .results import BenchResult
from .table4 import TABLE4


@dataclass(frozen=True)
class TableData:
    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    footer: tuple[str, ...] = ()  # lines that belong under the table


def num(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def size(n: int) -> str:
    for unit, s in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= s:
            return f"{n / s:.1f} {unit}"
    return f"{n} B"


def ms(seconds: float) -> str:
    v = seconds * 1e3
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def variants_table(r: BenchResult) -> TableData:
    rows = []
    dense = r.variant("dense")
    transformer = any((v.units or {}).get("heads") for v in r.variants)
    for v in r.variants:
        acc = f"{v.accuracy:.2%}" if v.accuracy is not None else "-"
        mem = size(v.memory.growth_bytes) if v.memory else "-"
        units = _units_cells(v, dense) if transformer else ()
        rows.append((v.name, num(v.macs), num(v.parameters),
                     f"{num(v.nonzero_weights)} ({v.nonzero_weights / max(1, dense.nonzero_weights):.1%})",
                     *units, size(v.file_bytes), mem, acc, v.source))
    footer = []
    if r.variants and r.variants[0].accuracy_images:
        footer.append(f"top-1 on {r.variants[0].accuracy_images} test images of {r.config.data}")
    if transformer:
        footer.append("heads: attention heads the graph computes; MLP neurons: hidden units between an MLP's two "
                      "layers; kept of the dense model's")
    units_header = ("heads", "MLP neurons") if transformer else ()
    return TableData("variants", ("variant", f"MACs/{_unit(r)}", "params", "nonzero weights", *units_header, "file",
                                  "peak memory", "top-1", "source"), tuple(rows), tuple(footer))


def _unit(r: BenchResult) -> str:
    """What one row of a batch is: an image for a model of (batch, C, H, W) images, else a sample (a waveform, a
    sequence of token ids, several inputs)."""
    return "image" if len(r.variant("dense").input_shape) == 4 else "sample"


def _units_cells(v, dense) -> tuple[str, str]:
    """Heads and MLP neurons kept of the dense model's, as `kept/dense`."""
    def cell(key: str) -> str:
        mine, full = (v.units or {}).get(key), (dense.units or {}).get(key)
        return "-" if mine is None or full is None else f"{sum(mine)}/{sum(full)}"
    return cell("heads"), cell("neurons")


def timing_tables(r: BenchResult) -> list[TableData]:
    out = []
    groups = list(dict.fromkeys((p, t) for p, t, _ in r.settings()))
    for provider, threads in groups:
        rows = []
        for p, t, b in r.settings():
            if (p, t) != (provider, threads):
                continue
            for name in r.variant_order():
                x = r.timing(name, p, t, b)
                sp = "1.00x" if name == "dense" else \
                    f"{x.speedup:.2f}x [{x.speedup_ci[0]:.2f}, {x.speedup_ci[1]:.2f}]"
                rows.append((str(b), name, ms(x.median_s), ms(x.p90_s), ms(x.iqr_s), f"{x.throughput:,.0f}", sp,
                             str(len(x.samples_s))))
        out.append(TableData(f"latency: {provider}, {threads} thread(s)",
                             ("batch", "variant", "median ms", "p90 ms", "IQR ms", f"{_unit(r)}s/s", "speed-up [95% CI]",
                              "rounds"), tuple(rows)))
    return out


def short_name(node: str) -> str:
    """'/layer2/layer2.1/conv1/Conv' -> 'layer2.1/conv1': the exporter's scope path without its repeats."""
    parts = [p for p in node.strip("/").split("/") if p]
    if len(parts) > 1 and parts[-1] in ("Conv", "MatMul", "Gemm"):
        parts = parts[:-1]
    kept = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
    return "/".join(kept) or node


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def layers_tables(r: BenchResult) -> list[TableData]:
    out = []
    for device, threads in dict.fromkeys((x.device, x.threads) for x in r.layers):
        rows = []
        for x in r.layers:
            if (x.device, x.threads) != (device, threads):
                continue
            d = x.unstructured.get(L.DENSE)
            rows.append((short_name(x.name), f"{x.M} x {x.K} x {x.N}", f"{x.sparsity:.1%}", ms(d.median_s),
                         _x(x.speedup(L.CSR)), _x(x.speedup(L.SCIPY_CSR)),
                         f"{x.compact[0]} x {x.compact[1]}" if x.compact else "removed",
                         _x(x.ideal), _x(x.speedup(L.COMPACT))))
        batch = r.layers[0].batch
        where = device if threads is None else f"{device}, {threads} thread(s)"
        out.append(TableData(f"per-layer GEMM study: {where}, batch {batch}",
                             ("conv", "GEMM M x K x N", "unstructured zeros", "dense ms", "CSR x", "scipy CSR x",
                              "compact M' x K'", "ideal x", "compact x"), tuple(rows)))
    return out


def paper_tables(r: BenchResult) -> list[TableData]:
    if r.paper is None:
        return []
    out = []
    for run in r.paper.runs:
        rows = []
        for a, b, p in zip(run.l1, run.ssl, TABLE4, strict=True):
            csr = a.get(L.CSR)
            c = b.get(L.COMPACT)
            scipy = f"{a.speedup(L.SCIPY_CSR):.2f}x" if any(t.contender == L.SCIPY_CSR for t in a.timings) else "-"
            rows.append((a.name, f"{a.M} x {a.K} x {a.N}", f"{a.sparsity:.1%}", f"{csr.speedup:.2f}x", scipy,
                         f"{p.cpu_l1:.2f}x", f"{b.col_sparsity:.1%} / {b.row_sparsity:.1%}",
                         f"{a.M * a.K / max(1, c.M * c.K):.2f}x", f"{c.speedup:.2f}x", f"{p.cpu_ssl:.2f}x"))
        s = run.summary()
        rows.append(("mean", "", "", f"{s['l1_torch_csr']:.2f}x", f"{s['l1_scipy_csr']:.2f}x" if "l1_scipy_csr" in s
                     else "-", f"{s['paper_l1']:.2f}x", "", f"{s['ssl_ideal']:.2f}x", f"{s['ssl']:.2f}x",
                     f"{s['paper_ssl']:.2f}x"))
        footer = (f"SSL / l1 (torch CSR): ours {s['ssl_over_l1_torch_csr']:.2f}, paper {s['paper_ssl_over_l1']:.2f};"
                  f" backend: {run.backend}",)
        out.append(TableData(f"Table 4 ({r.paper.model}, {r.paper.shapes} shapes, batch {r.paper.batch}):"
                             f" {run.threads} thread(s), CPU",
                             ("layer", "GEMM M x K x N", "l1 zeros", "CSR x", "scipy CSR x", "paper l1 x",
                              "col / row zeros", "ideal x", "compact x", "paper SSL x"), tuple(rows), footer))
    return out


def all_tables(r: BenchResult) -> list[TableData]:
    out = [variants_table(r)] if r.variants else []
    return out + timing_tables(r) + layers_tables(r) + paper_tables(r)


def _cpu_words(env: dict) -> str:
    """" of <model> (<extensions>)" where the run recorded them (results of older versions did not)."""
    if not env.get("cpu"):
        return ""
    isa = env.get("cpu_isa")
    return f" of {env['cpu']}" + (f" ({', '.join(isa) if isa else 'no AVX2'})" if isa is not None else "")


def render_markdown(r: BenchResult) -> str:
    target = r.config.target or ", ".join(f"--{k} {getattr(r.config, k)}" for k in ("dense", "unstructured",
                                                                                      "structured")
                                          if getattr(r.config, k)) or "the paper's Table 4"
    e = r.env
    lines = [f"# sslcompress bench: {target}", "",
             f"{r.created}; onnxruntime {e.get('onnxruntime')}, torch {e.get('torch')}, {e.get('cpus')} CPU(s)"
             f"{_cpu_words(e)}, {e.get('platform')}.", ""]
    for t in all_tables(r):
        lines += [f"## {t.title}", "", "| " + " | ".join(t.headers) + " |",
                  "|" + "|".join("---" for _ in t.headers) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
        lines += [""] + [f"{f}" for f in t.footer] + ([""] if t.footer else [])
    if r.layers_skipped:
        lines += ["Convs not in the per-layer study: " + ", ".join(f"{k} ({v})" for k, v in r.layers_skipped.items())
                  + ".", ""]
    if r.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    return "\n".join(lines)
