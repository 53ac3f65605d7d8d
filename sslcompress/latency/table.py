"""The latency table: per layer signature, the measured milliseconds of its op on a grid of widths (on the CPU,
the op's compute time read from ORT's profiler: kernel.py), and per profiled model, the whole models' latencies
that calibrate the sum of its layers. JSON on disk."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..io import atomic_write_json
from .key import TableKey
from .signature import Signature

FORMAT = "sslcompress-latency-table"
MAX_CONDITION = 1e3  # a calibration system worse conditioned than this amplifies timing noise beyond use
VERSION = 5  # 2: the key holds the channel block, and whole-model runs include random variants; 3: a CPU op's
#               figure is its compute time in ORT's profiler (kernel.py), not a session call's wall time; 4: each
#               point holds the layout reorders ORT put around the op, each whole-model run the reorders its
#               widths need, and the table a reorder curve per conv output size; 5: input widths below one
#               block are their own kind, and block - 1 is on the grid (signature.input_kind)


class StaleTableError(ConfigError):
    """A table an older (or newer) sslcompress wrote: its measurements are not read, so it is profiled afresh."""


@dataclass
class Entry:
    """One signature's op timed at every (input width, output width) of a rectangular grid, median ms."""

    signature: Signature
    points: dict[tuple[int, int], float] = field(default_factory=dict)
    # Per point, the ms of the ReorderInput and ReorderOutput ORT put around the op when it ran it blocked (0
    # where it put none): what a whole graph pays where this op meets one of the other layout (layout.py).
    reorders: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)

    def ins(self) -> list[int]:
        return sorted({i for i, _ in self.points})

    def outs(self) -> list[int]:
        return sorted({o for _, o in self.points})


@dataclass(frozen=True)
class WholeRun:
    """One whole model timed in ORT, beside its layers' table sums split by the kind of op ORT makes of them:
    blocked (convs whose input width fills whole blocks of 8, run in ORT's NCHWc layout) and plain."""

    label: str  # "dense", "off-block" (every free width one narrower), "half" (every free width halved)
    total_ms: float
    blocked_ms: float
    plain_ms: float
    reorder_ms: float = 0.0  # the layout reorders this model's widths need (layout.py), at their table figures

    @property
    def layers_ms(self) -> float:
        return self.blocked_ms + self.plain_ms


@dataclass
class ModelTiming:
    """The whole-model timings that calibrate a model's predictions (predict.py): the dense model first, then
    its variants, timed in the same rounds."""

    name: str
    runs: list[WholeRun]

    @property
    def total_ms(self) -> float:
        return self.runs[0].total_ms

    @property
    def layers_ms(self) -> float:
        return self.runs[0].layers_ms

    @property
    def overhead_ms(self) -> float:
        """What the dense model costs beyond its layers' ops alone (activations, adds, pooling, layout changes);
        negative where the whole graph saves more than these cost (ORT's fusions, reorders paid once)."""
        return self.total_ms - self.layers_ms

    def calibration(self) -> tuple[float, float, float]:
        """(constant ms, blocked factor, plain factor) with total = constant + blocked x B + plain x P.

        Three forms, each fitted to the runs by least squares on the relative error (each run's T_hat / T = 1):
        a constant and both factors, both factors alone, one factor for all ops. A form counts only where it is
        well posed (the runs mix the kinds differently) and physical: factors positive, every run predicted
        above nothing. The constant is what the whole model pays beside its ops' compute (the session call,
        pooling, the adds ORT does not fuse, layout reorders where blocked and plain ops meet) less what the
        ops' figures hold that the model does not pay (the profiler's own cost per node on the CPU; a session
        call per op in a table of wall times), so it may be negative. Of the forms that count, the one whose fit predicts each run best from the others
        (leave-one-out, mean relative error) is taken, where every one has runs enough to leave one out; else
        the richest. Without any: one factor, the dense total over its layers' sum."""
        # The reorders are measured ops, paid as measured: the forms fit what is left beside them.
        runs = [(r.total_ms - r.reorder_ms, r.blocked_ms, r.plain_ms) for r in self.runs]
        if any(total <= 0 for total, _, _ in runs):
            runs = [(r.total_ms, r.blocked_ms, r.plain_ms) for r in self.runs]
        forms = [lambda b, p: (1.0, b, p), lambda b, p: (b, p), lambda b, p: (b + p,)]
        fits = []
        for form in forms:
            x = _fit(form, runs)
            if x is not None:
                fits.append((_leave_one_out(form, runs), form, x))
        if fits:
            scored = all(f[0] is not None for f in fits)
            _, form, x = min(fits, key=lambda f: f[0]) if scored else fits[0]
            return _as_calibration(form, x)
        dense = self.runs[0]
        ratio = max(dense.total_ms - dense.reorder_ms, 0.0) / dense.layers_ms if dense.layers_ms > 0 else 1.0
        return 0.0, ratio, ratio


def _fit(form, runs: list[tuple[float, float, float]]) -> np.ndarray | None:
    """Least squares of T_hat / T = 1 over `runs` (total, blocked, plain) in the terms `form` makes of them;
    None where that is ill-posed or unphysical (see ModelTiming.calibration)."""
    if len(runs) < len(form(0.0, 0.0)):
        return None
    rows = np.array([form(b, p) for _, b, p in runs], dtype=float) / np.array([[t] for t, _, _ in runs])
    if not np.all(np.isfinite(rows)) or np.linalg.cond(rows) > MAX_CONDITION:
        return None
    x = np.linalg.lstsq(rows, np.ones(len(runs)), rcond=None)[0]
    constant, blocked, plain = _as_calibration(form, x)
    if blocked <= 0 or plain <= 0 or min(constant + blocked * b + plain * p for _, b, p in runs) <= 0:
        return None
    return x


def _as_calibration(form, x: np.ndarray) -> tuple[float, float, float]:
    terms = len(form(0.0, 0.0))
    if terms == 3:
        return float(x[0]), float(x[1]), float(x[2])
    if terms == 2:
        return 0.0, float(x[0]), float(x[1])
    return 0.0, float(x[0]), float(x[0])


def _leave_one_out(form, runs: list[tuple[float, float, float]]) -> float | None:
    """Mean relative error of each run predicted by the form fitted to the others; None where the others
    are too few to fit it."""
    errors = []
    for i, (total, b, p) in enumerate(runs):
        x = _fit(form, runs[:i] + runs[i + 1:])
        if x is None or len(runs) - 1 <= len(form(0.0, 0.0)):
            return None
        constant, blocked, plain = _as_calibration(form, x)
        errors.append(abs((constant + blocked * b + plain * p) / total - 1))
    return float(np.mean(errors))


@dataclass
class LatencyTable:
    key: TableKey
    entries: dict[str, Entry] = field(default_factory=dict)  # by Signature.ident()
    models: dict[str, ModelTiming] = field(default_factory=dict)  # by the model's fingerprint
    # Per spatial size ("32x32"), ms of a ReorderOutput of 1, 2, ..., block + 1 channels: a part block costs
    # more than a whole one (predict.reorder_out_ms), which a grid of the convs' widths does not show.
    reorder_curves: dict[str, dict[int, float]] = field(default_factory=dict)

    def entry(self, sig: Signature) -> Entry:
        """The signature's entry, made empty where the table has none."""
        return self.entries.setdefault(sig.ident(), Entry(sig))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "key": self.key.to_dict(),
            "entries": [{"signature": e.signature.to_dict(),
                         "points": [[i, o, ms, *e.reorders.get((i, o), (0.0, 0.0))]
                                    for (i, o), ms in sorted(e.points.items())]}
                        for e in self.entries.values()],
            "models": {fp: {"name": m.name, "runs": [asdict(r) for r in m.runs]} for fp, m in self.models.items()},
            "reorder_curves": {hw: [[w, ms] for w, ms in sorted(c.items())] for hw, c in self.reorder_curves.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyTable:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ConfigError("not a latency table (its format field is missing or another)")
        if d.get("version") != VERSION:
            raise StaleTableError(f"a latency table of version {d.get('version')!r}; this sslcompress reads {VERSION} "
                                  "(profile the model again)")
        table = cls(TableKey.from_dict(d["key"]))
        for raw in d.get("entries", []):
            entry = table.entry(Signature.from_dict(raw["signature"]))
            entry.points = {(int(i), int(o)): float(ms) for i, o, ms, *_ in raw["points"]}
            entry.reorders = {(int(i), int(o)): (float(rest[0]), float(rest[1]))
                              for i, o, _, *rest in raw["points"] if len(rest) == 2}
        table.models = {fp: _model_timing(m) for fp, m in d.get("models", {}).items()}
        table.reorder_curves = {str(hw): {int(w): float(ms) for w, ms in c}
                                for hw, c in d.get("reorder_curves", {}).items()}
        return table


def _model_timing(d: dict[str, Any]) -> ModelTiming:
    runs = [WholeRun(str(r["label"]), float(r["total_ms"]), float(r["blocked_ms"]), float(r["plain_ms"]),
                     float(r.get("reorder_ms", 0.0))) for r in d["runs"]]
    if not runs:
        raise ValueError("a model timing without runs")
    return ModelTiming(str(d["name"]), runs)


def save_table(table: LatencyTable, path: str | Path) -> None:
    """Written atomically: a reader never sees half a table, two writers leave one whole one."""
    atomic_write_json(table.to_dict(), path)


def load_table(path: str | Path, key: TableKey | None = None) -> LatencyTable:
    """The table at `path`; with `key`, refused unless it was measured for that key."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p} is not a latency table (not JSON: {exc.msg})") from exc
    try:
        table = LatencyTable.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{p} is a damaged latency table ({exc})") from exc
    except ConfigError as exc:
        raise type(exc)(f"{p}: {exc}") from exc
    if key is not None and table.key != key:
        raise ConfigError(f"{p} holds latencies measured for {_describe(table.key)}, not for {_describe(key)}")
    bad = [e.signature.ident() for e in table.entries.values() if not all(math.isfinite(v) and v > 0
                                                                          for v in e.points.values())]
    if bad:
        raise ConfigError(f"{p} has latencies that are not positive numbers (at {bad[0]})")
    return table


def _describe(key: TableKey) -> str:
    return (f"{key.machine} ({key.cpus} CPUs, channel block {key.block}), onnxruntime {key.ort_version}, "
            f"{key.provider}, {key.threads} thread(s), batch {key.batch}")
