"""Terminal output of the CLI: progress bars from library events, and report tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from .finetune.loop import Event

_console = Console(stderr=True)
# Reports print names as they are: module names, paths and intervals hold brackets, not markup.
_out = Console(width=None if Console().is_terminal else 132, markup=False)


class Progress:
    """One bar per epoch with loss, accuracy and sparsity; a line per finished epoch."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar: RichProgress | None = None
        self._task = None
        self._key: tuple[str, int] | None = None
        self._sparsity = ""

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[stats]}"), console=_console, transient=True,
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def on_event(self, e: Event) -> None:
        if not self.enabled or self._bar is None:
            return
        if e.message:
            self._bar.console.print(f"[bold]{e.message}[/bold]")
            return
        if e.end_of_epoch:
            parts = [f"{e.phase} epoch {e.epoch + 1}/{e.epochs}", f"loss {e.loss:.4f}"]
            if e.accuracy is not None:
                parts.append(f"test acc {e.accuracy:.2%}")
            if e.macs_fraction is not None:
                parts.append(f"MACs {e.macs_fraction:.1%}")
            if e.zero_groups is not None:
                parts.append(f"zero groups {e.zero_groups:.1%}")
            if e.lambdas:
                parts.append("lambda " + ",".join(f"{k}={v:.3g}" for k, v in e.lambdas.items()))
            self._bar.console.print("  ".join(parts))
            if e.macs_fraction is not None:
                # Group sparsity is measured once per epoch; the next epoch's bar shows it.
                self._sparsity = f"MACs {e.macs_fraction:.1%}" + (
                    f" zero groups {e.zero_groups:.1%}" if e.zero_groups is not None else "")
            if self._task is not None:
                self._bar.remove_task(self._task)
                self._task, self._key = None, None
            return
        key = (e.phase, e.epoch)
        stats = f"loss {e.loss:.4f} acc {e.accuracy:.2%}" if e.loss is not None else ""
        if e.phase in ("sparsify", "finetune") and self._sparsity:
            stats += f"  {self._sparsity}"
        if key != self._key:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(f"{e.phase} {e.epoch + 1}/{e.epochs}", total=e.steps, stats=stats)
            self._key = key
        self._bar.update(self._task, completed=e.step, stats=stats)


def _kept(pair: list[int]) -> str:
    return f"{pair[0]}/{pair[1]}"


def _num(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def print_report(report: dict[str, Any]) -> None:
    if not report:
        _out.print("(no report stored)")
        return
    table = Table(title=f"{report.get('model')} on {report.get('data')} ({report.get('method')})")
    for col in ("layer", "filters", "channels", "kernel", "columns", "MACs", "MACs after", "GEMM MACs after",
                "params after"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for lay in report.get("layers", []):
        kernel = f"{lay['kernel'][0]}x{lay['kernel'][1]}"
        if lay["kernel_after"] != lay["kernel"]:
            kernel += f" -> {lay['kernel_after'][0]}x{lay['kernel_after'][1]}"
        table.add_row(
            lay["name"] + (" (removed)" if lay.get("removed") else ""), _kept(lay["filters"]),
            _kept(lay["channels"]), kernel, _kept(lay["columns"]), _num(lay["macs"]), _num(lay["macs_after"]),
            _num(lay["macs_gemm_after"]), f"{_num(lay['params_after'])}/{_num(lay['params'])}",
        )
    t = report["totals"]
    table.add_section()
    params_fraction = t["params_after"] / t["params"] if t.get("params") else 1.0
    table.add_row("total", "", "", "", "", _num(t["macs"]), f"{_num(t['macs_after'])} ({t['macs_fraction']:.1%})",
                  f"{_num(t['macs_gemm_after'])} ({t['macs_gemm_fraction']:.1%})",
                  f"{_num(t['params_after'])}/{_num(t['params'])} ({params_fraction:.1%})")
    _out.print(table)
    lines = []
    if report.get("blocks_total"):
        removed = report.get("blocks_removed", [])
        lines.append(f"residual blocks removed: {len(removed)}/{report['blocks_total']}"
                     + (f" ({', '.join(removed)})" if removed else ""))
    acc = {k: v for k, v in (report.get("accuracy") or {}).items() if v is not None}
    if acc:
        lines.append("accuracy: " + ", ".join(f"{k.replace('_', ' ')} {v:.2%}" for k, v in acc.items()))
    groups = report.get("groups")
    if groups:
        kinds = ", ".join(f"{k} {v['zero']}/{v['removable']} zero" for k, v in groups["kinds"].items())
        lines.append(f"groups: {kinds}")
        if groups.get("not_removable"):
            lines.append("not removable: " + ", ".join(f"{n} ({why})" for why, n in groups["not_removable"].items()))
    units = report.get("units") or {}
    for key, what, label in (("heads", "attention", "heads kept"), ("neurons", "layer", "neurons kept")):
        if units.get(key):
            lines.append(f"{label}: " + ", ".join(f"{u[what]} {u['kept']}/{u['total']}" for u in units[key]))
    budget = report.get("budget")
    if budget:
        lines.append(_budget_line(budget))
    latency = report.get("latency")
    if latency:
        lines.append(f"latency ({latency['provider']}, {latency['threads']} thread(s), batch {latency['batch']}): "
                     f"predicted {latency['predicted_ms']:.3g} ms against {latency['dense_ms']:.3g} ms dense "
                     f"(asked {latency['asked_ms']:.3g} ms; table {latency['table']})")
    if report.get("widths"):
        lines.append(_widths_line(report["widths"], report.get("align")))
    at_floor = [w for w in report.get("min_widths") or [] if w["kept"] <= w["min"]]
    if at_floor:
        lines.append(f"at the floor (--min-keep {report['min_keep']:g}; a lower value lets them thin further): "
                     + ", ".join(f"{_unit_name(w['layers'])} {w['kept']}" for w in at_floor))
    if report.get("forced_groups"):
        lines.append(f"{report['forced_groups']} groups zeroed by rank (weakest first) to land on the budget or "
                     "the alignment")
    wall = report.get("wall_time_s")
    if wall:
        lines.append("wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in wall.items()))
    for line in lines:
        _out.print(line)


def _budget_line(budget: dict[str, Any]) -> str:
    """Asked against reached, per metric: `budget: MACs 59.6% (asked 60.0%), parameters 71.2% (not asked)`."""
    parts = []
    for key, name in (("macs", "GEMM MACs" if budget.get("measure") == "gemm macs" else "MACs"),
                      ("params", "parameters"), ("latency", "predicted latency")):
        row = budget.get(key)
        if not row:
            continue
        asked = f"asked {row['asked']:.1%}" if row.get("asked") is not None else "not asked"
        parts.append(f"{name} {row['reached']:.1%} ({asked})")
    met = budget.get("met_at")
    where = f"; met in sparsify epoch {met['epoch'] + 1}, step {met['step']}" if met else ""
    return "budget: " + ", ".join(parts) + where


def _unit_name(layers: list[str]) -> str:
    """A width by the first of the layers that write it: `layer3.0.conv2 +3`."""
    return layers[0] + (f" +{len(layers) - 1}" if len(layers) > 1 else "")


def _widths_line(widths: list[dict[str, Any]], align: Any) -> str:
    """Every width kept (a unit of coupled layers named by its first), and the ones alignment leaves as they are."""
    shown = []
    for w in widths:
        name = _unit_name(w["layers"])
        mark = "" if w.get("aligned") in (True, None) else " (not a multiple)"
        if w.get("exempt") and not w["exempt"].startswith("pinned"):
            mark = f" ({w['exempt']})"
        shown.append(f"{name} {w['kept']}/{w['total']}{mark}")
    return f"widths kept (multiples of {align}): " + ", ".join(shown)


def print_quantize_report(report: dict[str, Any]) -> None:
    """`quantize`'s lines: top-1 before and after, what calibrated it, what it became."""
    acc, cal, size = report["accuracy"], report["calibration"], report["bytes"]
    drop = 100 * (acc["float32"] - acc["int8"])
    change = f"{drop:.2f} points lost" if drop >= 0 else f"{-drop:.2f} points gained"
    _out.print(f"top-1 on {acc['test_images']} test images: float32 {acc['float32']:.2%}, int8 {acc['int8']:.2%} "
               f"({change})")
    _out.print(f"{report['format']}: weights {report['weights']}, activations {report['activations']} calibrated "
               f"({cal['method']}) on {cal['images']} training images of {cal['data']}")
    _out.print(f"file: {size['before'] / 1024:.1f} KiB -> {size['after'] / 1024:.1f} KiB; "
               f"{report['nodes'].get('QuantizeLinear', 0)} QuantizeLinear, "
               f"{report['nodes'].get('DequantizeLinear', 0)} DequantizeLinear; {report['seconds']:.1f}s")
    for note in report.get("notes", []):
        _out.print(f"note: {note}")


def print_surgery_report(report: dict[str, Any]) -> None:
    table = Table(title="surgery")
    for col in ("layer", "op", "weight", "MACs", "MACs after"):
        table.add_column(col, justify="left" if col in ("layer", "op") else "right")
    lowered = {d["name"] for d in (report.get("shape_lowering") or {}).get("convs", []) if d["lowered"]}
    for lay in report["layers"]:
        w = "x".join(map(str, lay["weight"]))
        if lay["name"] in lowered and lay["weight_after"]:
            w += " -> " + "x".join(map(str, lay["weight_after"])) + " (im2col + MatMul)"
        elif lay["weight_after"] != lay["weight"]:
            w += " -> " + ("x".join(map(str, lay["weight_after"])) if lay["weight_after"] else "removed")
        table.add_row(lay["name"], lay["op"], w, _num(lay["macs"]), _num(lay["macs_after"]))
    t = report["totals"]
    table.add_section()
    table.add_row("total", "", "", _num(t["macs"]), f"{_num(t['macs_after'])} ({t['macs_fraction']:.1%})")
    _out.print(table)
    v = report["verification"]
    _out.print(f"parameters {_num(t['params'])} -> {_num(t['params_after'])}, nodes {t['nodes']} -> "
               f"{t['nodes_after']}, file {_num(t['bytes'])}B -> {_num(t['bytes_after'])}B, "
               f"channels removed {t['channels_removed']}, residual branches removed "
               f"{len(report.get('blocks_removed', []))}"
               + (f" (and {len(report['blocks_constant'])} replaced by their constant)"
                  if report.get("blocks_constant") else "")
               + f", kernels shrunk {len(report.get('kernels_shrunk', {}))}")
    if report.get("constant_channels_folded"):
        maps = report.get("constant_maps_added") or []
        _out.print(f"constant channels folded into their readers: {report['constant_channels_folded']}"
                   + (f" (constant maps after {', '.join(maps)})" if maps else ""))
    blocked = report.get("blocked_by") or {}
    if blocked:
        _out.print("channels that could go but stay, and what keeps them: "
                   + ", ".join(f"{n} by {why}" for why, n in blocked.items()))
    if report.get("quantized_weights"):
        _out.print(f"quantized weights (QDQ): {report['quantized_weights']} layers, cut in their quantized "
                   "tensors with their scales and zero points")
    qop = report.get("qoperator_layers") or {}
    if qop:
        _out.print("quantized in the QOperator format (" + ", ".join(f"{n} {op}" for op, n in qop.items())
                   + "): walls, nothing in them is cut; quantize with the QDQ format (quant_format=QDQ) "
                   "for the surgery to cut quantized layers")
    kept = report.get("zeros_kept") or {}
    if kept:
        _out.print("zero channels found but kept, and why: " + ", ".join(f"{n} by {why}" for why, n in kept.items()))
    for add, why in (report.get("zero_branches_kept") or {}).items():
        _out.print(f"zero or constant residual branch kept at {add}: {why}")
    for conv, why in (report.get("constant_channels_kept") or {}).items():
        _out.print(f"constant channels kept at {conv}: it {why}")
    _print_lowering(report.get("shape_lowering"))
    agree = f", top-1 agreement {v['top1_agreement']:.2%}" if v.get("top1_agreement") is not None else ""
    _out.print(f"verification: {'passed' if v['passed'] else 'FAILED'} (max abs diff {v['max_abs']:.3g}, "
               f"relative {v['rel']:.3g} over {v['inputs']} inputs{agree}); surgery "
               f"{report['seconds']['surgery']:.2f}s")
    if "macs_after_matches_prediction" in report:
        _out.print(count_agreement(report))


def count_agreement(report: dict[str, Any]) -> str:
    """How the compact model's MACs stand to the checkpoint's count of its removable groups, in one sentence."""
    after, counted = report["totals"]["macs_after"], report["predicted_macs_after"]
    where = f"the checkpoint's count of its removable groups ({_num(counted)})"
    if after == counted:
        return f"MACs after match {where}"
    if after < counted:
        # Not an error: folding constant channels, shrinking kernels and lowering convs to im2col over their
        # nonzero columns remove MACs that the training's count of zero groups does not model.
        return f"MACs after ({_num(after)}) are below {where}: the surgery also folded constants, shrank kernels " \
               "or lowered convs"
    why = "--align kept channels it removes" if report.get("align") else \
        "the surgery kept channels it removes (see blocked_by)"
    return f"MACs after ({_num(after)}) are above {where}: {why}"


def _print_lowering(lowering: dict[str, Any] | None) -> None:
    """Convs with zero weight columns: whether each became im2col + MatMul, and the times behind it."""
    convs = (lowering or {}).get("convs") or []
    if not convs:
        return
    n = sum(d["lowered"] for d in convs)
    table = Table(title=f"shape lowering ({lowering['mode']}): {n}/{len(convs)} convs lowered to im2col + MatMul")
    for col in ("conv", "columns kept", "zero", "MACs lowered/dense", "dense ms", "lowered ms", "lowered", "why"):
        table.add_column(col, justify="left" if col in ("conv", "why") else "right")
    for d in convs:
        ms = [f"{d[k]:.3f}" if d[k] is not None else "-" for k in ("dense_ms", "lowered_ms")]
        table.add_row(d["name"], _kept(d["columns"]), f"{d['column_sparsity']:.0%}",
                      f"{_num(d['macs'][1])}/{_num(d['macs'][0])}", *ms, "yes" if d["lowered"] else "no", d["reason"])
    _out.print(table)


class BenchProgress:
    """`sslcompress bench`: one bar whose text follows the run (rounds done while timing), a line per stage."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar: RichProgress | None = None
        self._task = None
        self._stage: str | None = None

    def __enter__(self) -> BenchProgress:
        if self.enabled:
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=_console, transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task("bench", total=None)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def on_event(self, e: Any) -> None:
        from rich.markup import escape
        from rich.text import Text

        if self._bar is None or self._task is None:
            return
        if e.stage != self._stage:
            self._stage = e.stage
            self._bar.console.print(Text.assemble((e.stage, "bold"), ": ", e.message))
        elif e.stage in ("build", "layers", "paper") and e.total is None:
            self._bar.console.print(Text("  " + e.message))
        self._bar.update(self._task, description=escape(f"{e.stage}: {e.message}"), completed=e.done, total=e.total)


def print_bench(result: Any) -> None:
    """The bench's tables (variants, latency per provider and threads, per-layer studies), then its notes."""
    from rich.text import Text

    from .bench.int8 import COMPOUNDING_HEAD
    from .bench.report import all_tables
    from .bench.results import UNSTRUCTURED_NOTE

    for t in all_tables(result):
        table = Table(title=t.title)
        for i, h in enumerate(t.headers):
            table.add_column(h, justify="left" if i == 0 or h in ("variant", "source", "conv", "layer") else "right",
                             overflow="fold", no_wrap=h == "variant")  # "structured-int8" whole, on one line
        for row in t.rows:
            table.add_row(*(Text(c) for c in row))  # no markup: paths and intervals hold brackets
        _out.print(table)
        for line in t.footer:
            _out.print(Text(line))
    if result.layers_skipped:
        _out.print(Text("convs not in the per-layer study: "
                        + ", ".join(f"{k} ({v})" for k, v in result.layers_skipped.items())))
    for note in result.notes:
        headline = note == UNSTRUCTURED_NOTE or note.startswith(COMPOUNDING_HEAD)
        _out.print(Text(note, style="bold" if headline else ""))
