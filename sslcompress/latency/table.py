"""The latency table: per layer signature, the measured milliseconds of its op on a grid of widths, and per
profiled model, the whole dense model's latency that calibrates the sum of its layers. JSON on disk."""

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
VERSION = 2  # 2: the key holds the channel block, and whole-model runs include random variants


@dataclass
class Entry:
    """One signature's op timed at every (input width, output width) of a rectangular grid, median ms."""

    signature: Signature
    points: dict[tuple[int, int], float] = field(default_factory=dict)

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

        Fitted to every run, each run's relative error weighing alike (least squares on T_hat / T = 1): with a
        constant where there are three runs or more, else, or where that fit fails, without it; failing both,
        one factor for all ops (the dense total over its layers' sum). A fit counts only where it is well posed
        (the runs mix the kinds differently) and physical: factors positive, and every run predicted above
        nothing. The constant may be negative: each op timed alone pays a session call and layout reorders
        that the whole graph does not (a fixed cost per op the factors would otherwise scale with the widths;
        on an AVX2 EPYC a random ResNet-20 narrowing kept 52% of its ops' table sum and ran in 37% of the
        dense time), and a model's ops are never cheaper alone than that overhead, so a prediction stays
        positive."""
        rows = np.array([(1.0, r.blocked_ms, r.plain_ms) for r in self.runs]) / \
            np.array([[r.total_ms] for r in self.runs])
        for terms in (3, 2):
            if len(rows) < terms:
                continue
            a = rows[:, 3 - terms:]
            if not np.all(np.isfinite(a)) or np.linalg.cond(a) > MAX_CONDITION:
                continue
            x = np.linalg.lstsq(a, np.ones(len(rows)), rcond=None)[0]
            constant, blocked, plain = (x if terms == 3 else (0.0, *x))
            fitted = [constant + blocked * r.blocked_ms + plain * r.plain_ms for r in self.runs]
            if blocked > 0 and plain > 0 and min(fitted) > 0:
                return float(constant), float(blocked), float(plain)
        ratio = self.total_ms / self.layers_ms if self.layers_ms > 0 else 1.0
        return 0.0, ratio, ratio


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
            "models": {fp: {"name": m.name, "runs": [asdict(r) for r in m.runs]} for fp, m in self.models.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyTable:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ConfigError("not a latency table (its format field is missing or another)")
        if d.get("version") != VERSION:
            raise ConfigError(f"a latency table of version {d.get('version')!r}; this sslcompress reads {VERSION} "
                              "(profile the model again)")
        table = cls(TableKey.from_dict(d["key"]))
        for raw in d.get("entries", []):
            entry = table.entry(Signature.from_dict(raw["signature"]))
            entry.points = {(int(i), int(o)): float(ms) for i, o, ms in raw["points"]}
        table.models = {fp: _model_timing(m) for fp, m in d.get("models", {}).items()}
        return table


def _model_timing(d: dict[str, Any]) -> ModelTiming:
    runs = [WholeRun(str(r["label"]), float(r["total_ms"]), float(r["blocked_ms"]), float(r["plain_ms"]))
            for r in d["runs"]]
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
        raise ConfigError(f"{p}: {exc}") from exc
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
