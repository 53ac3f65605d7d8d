"""The latency table: per layer signature, the measured milliseconds of its op on a grid of widths, and per
profiled model, the whole dense model's latency that calibrates the sum of its layers. JSON on disk."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import atomic_write_json
from .key import TableKey
from .signature import Signature

FORMAT = "sslcompress-latency-table"
VERSION = 1


@dataclass
class Entry:
    """One signature's op timed at every (input width, output width) of a rectangular grid, median ms."""

    signature: Signature
    points: dict[tuple[int, int], float] = field(default_factory=dict)

    def ins(self) -> list[int]:
        return sorted({i for i, _ in self.points})

    def outs(self) -> list[int]:
        return sorted({o for _, o in self.points})


@dataclass
class ModelTiming:
    """A whole dense model timed once in ORT beside the sum of its layers' table figures, and the same for
    its off-block variant (every free width one channel narrower), where there is one (predict.py says why).

    `blocked_ms` / `plain_ms` split a layers' sum into the ops that run in ORT's blocked layout (convs whose
    input width fills whole blocks of 8) and the others."""

    name: str
    total_ms: float  # the exported dense model, one session
    layers_ms: float  # the sum of its layers' ops at full width, from the table
    blocked_ms: float | None = None
    off_total_ms: float | None = None  # the off-block variant, exported and cut by the surgery
    off_blocked_ms: float | None = None
    off_plain_ms: float | None = None

    @property
    def overhead_ms(self) -> float:
        """What the model costs beyond its layers' ops (activations, adds, pooling, layout changes); negative
        where ORT's fusions in the whole graph save more than these ops cost."""
        return self.total_ms - self.layers_ms

    def factors(self) -> tuple[float, float] | None:
        """(blocked, plain): what one ms of a blocked / a plain op alone costs inside the whole model, solved
        from the two whole-model timings; None without the variant, or where the two do not tell the kinds
        apart (a singular system) or the solution is not positive."""
        if None in (self.blocked_ms, self.off_total_ms, self.off_blocked_ms, self.off_plain_ms):
            return None
        b1, p1, t1 = self.blocked_ms, self.layers_ms - self.blocked_ms, self.total_ms
        b2, p2, t2 = self.off_blocked_ms, self.off_plain_ms, self.off_total_ms
        det, scale = b1 * p2 - p1 * b2, max(b1 * p2, p1 * b2)
        if scale <= 0 or abs(det) < 0.05 * scale:  # the two models mix the kinds alike
            return None
        blocked, plain = (t1 * p2 - p1 * t2) / det, (b1 * t2 - t1 * b2) / det
        return (blocked, plain) if blocked > 0 and plain > 0 else None


@dataclass
class LatencyTable:
    key: TableKey
    entries: dict[str, Entry] = field(default_factory=dict)  # by Signature.ident()
    models: dict[str, ModelTiming] = field(default_factory=dict)  # by the model's fingerprint

    def entry(self, sig: Signature) -> Entry:
        """The signature's entry, made empty where the table has none."""
        return self.entries.setdefault(sig.ident(), Entry(sig))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "key": self.key.to_dict(),
            "entries": [{"signature": e.signature.to_dict(),
                         "points": [[i, o, ms] for (i, o), ms in sorted(e.points.items())]}
                        for e in self.entries.values()],
            "models": {fp: asdict(m) for fp, m in self.models.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyTable:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ConfigError("not a latency table (its format field is missing or another)")
        if d.get("version") != VERSION:
            raise ConfigError(f"a latency table of version {d.get('version')!r}; this sslcompress reads {VERSION}")
        table = cls(TableKey.from_dict(d["key"]))
        for raw in d.get("entries", []):
            entry = table.entry(Signature.from_dict(raw["signature"]))
            entry.points = {(int(i), int(o)): float(ms) for i, o, ms in raw["points"]}
        table.models = {fp: _model_timing(m) for fp, m in d.get("models", {}).items()}
        return table


def _model_timing(d: dict[str, Any]) -> ModelTiming:
    optional = ("blocked_ms", "off_total_ms", "off_blocked_ms", "off_plain_ms")
    return ModelTiming(str(d["name"]), float(d["total_ms"]), float(d["layers_ms"]),
                       *(None if d.get(k) is None else float(d[k]) for k in optional))


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
        raise ConfigError(f"{p}: {exc}") from exc
    if key is not None and table.key != key:
        raise ConfigError(f"{p} holds latencies measured for {_describe(table.key)}, not for {_describe(key)}")
    bad = [e.signature.ident() for e in table.entries.values() if not all(math.isfinite(v) and v > 0
                                                                          for v in e.points.values())]
    if bad:
        raise ConfigError(f"{p} has latencies that are not positive numbers (at {bad[0]})")
    return table


def _describe(key: TableKey) -> str:
    return (f"{key.machine} ({key.cpus} CPUs), onnxruntime {key.ort_version}, {key.provider}, "
            f"{key.threads} thread(s), batch {key.batch}")
