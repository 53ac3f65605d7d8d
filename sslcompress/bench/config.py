"""What a bench run is asked to do: one frozen dataclass, checked before any work starts."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError

DEFAULT_BATCHES = (1, 8)
DEFAULT_REPEAT = 20
EXTRA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The variants a bench builds itself: an added one takes another name.
RESERVED_NAMES = ("dense", "unstructured", "structured", "dense-int8", "structured-int8")
MAX_MIN_TIME = 3600.0  # seconds per setting: an hour of rounds is already far past any stable median


@dataclass(frozen=True)
class BenchConfig:
    """Options of `sslcompress bench`; paths are kept as given."""

    target: str | None = None  # run folder, checkpoint or ONNX model with zeros
    dense: str | None = None
    unstructured: str | None = None
    structured: str | None = None
    providers: tuple[str, ...] = ("cpu",)
    threads: tuple[int, ...] = (1,)
    batches: tuple[int, ...] | None = None  # None: DEFAULT_BATCHES that every variant takes
    warmup: int = 5
    repeat: int | None = None  # rounds; None with min_time None: DEFAULT_REPEAT
    min_time: float | None = None  # seconds of rounds per (provider, threads, batch)
    sample_time: float = 0.005  # a sample lasts at least this long (back-to-back calls)
    data: str | None = None
    data_limit: int = 1000
    layers: bool = False
    paper_table: str | None = None
    memory: bool = True
    pin: bool = True  # the calling thread and the ORT workers on the same CPUs for every variant (CPU provider)
    models_dir: str | None = None  # also write the ONNX variants here
    seed: int = 0
    int8: bool = False  # also dense-int8 and structured-int8, calibrated on `data`'s training images
    calibration: int = 256  # training images that calibrate the INT8 activation ranges
    input_size: tuple[int, ...] | None = None  # sizes after the batch (the model's order) for dynamic-size models
    extra: tuple[tuple[str, str], ...] = ()  # (name, ONNX path) of more variants timed beside the others
    dims: tuple[tuple[str, int], ...] = ()  # named input dimensions fixed at a size (a sequence length)

    def __post_init__(self) -> None:
        if self.repeat is not None and self.min_time is not None:
            raise ConfigError("give --repeat or --min-time, not both")
        if self.repeat is not None and self.repeat < 1:
            raise ConfigError(f"--repeat must be at least 1, got {self.repeat}")
        if self.min_time is not None and not (0 < self.min_time <= MAX_MIN_TIME):
            raise ConfigError(f"--min-time must be a number of seconds in (0, {MAX_MIN_TIME:g}], got {self.min_time}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {self.seed!r}")
        if self.warmup < 0 or not 0 < self.sample_time <= MAX_MIN_TIME or self.data_limit < 1:
            raise ConfigError("--warmup >= 0, a positive sample time and --data-limit >= 1 are required")
        for name, values in (("threads", self.threads), ("batch", self.batches or (1,))):
            if not values or any(int(v) < 1 for v in values):
                raise ConfigError(f"--{name} wants positive integers, got {values!r}")
        if not self.providers:
            raise ConfigError("give at least one --provider")
        if self.int8 and self.data is None:
            raise ConfigError("--int8 needs --data SPEC: the INT8 variants are calibrated on that data set's"
                              " training images (e.g. --data digits)")
        if self.input_size is not None and (not self.input_size or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.input_size)):
            raise ConfigError(f"--input-shape wants positive sizes such as 3,224,224, got {self.input_size!r}")
        for name, size in self.dims:
            if not name or isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(f"--dim wants NAME=SIZE with a positive size, got {name}={size!r}")
        names = [n for n, _ in self.extra]
        for name in names:
            if not EXTRA_NAME.fullmatch(name) or name in RESERVED_NAMES:
                raise ConfigError(f"--variant wants NAME=MODEL.onnx with a name of letters, digits, '.', '_' or '-'"
                                  f" other than {', '.join(RESERVED_NAMES)}; got {name!r}")
        if len(set(names)) != len(names):
            raise ConfigError(f"--variant names must differ, got {', '.join(names)}")
        if self.extra and not self.benches_models:
            raise ConfigError("--variant adds models to a bench of a model: give a run folder, a checkpoint or an"
                              " ONNX model too")
        if self.calibration < 1:
            raise ConfigError(f"--calibration must be a positive number of images, got {self.calibration}")
        if self.target is None and self.paper_table is None and (self.dense is None or self.structured is None):
            raise ConfigError("give a run folder, a checkpoint or an ONNX model to bench (or --dense and"
                              " --structured, or --paper-table alexnet)")
        if self.int8 and not self.benches_models:
            raise ConfigError("--int8 quantizes the benched models: give a run folder, a checkpoint or an ONNX"
                              " model too")

    @property
    def rounds(self) -> int | None:
        """Rounds to run, None where min_time decides."""
        if self.min_time is not None:
            return None
        return self.repeat or DEFAULT_REPEAT

    @property
    def benches_models(self) -> bool:
        return self.target is not None or self.dense is not None or self.structured is not None \
            or self.unstructured is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("providers", "threads", "batches"):
            d[k] = list(d[k]) if d[k] is not None else None
        if not self.int8:  # a bench without --int8 writes the keys it always wrote
            del d["int8"], d["calibration"]
        for k in ("extra", "dims"):  # written only when given, as the files before them were
            if getattr(self, k):
                d[k] = [list(e) for e in getattr(self, k)]
            else:
                del d[k]
        if self.input_size is None:
            del d["input_size"]
        else:
            d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchConfig:
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for k in ("providers", "threads", "batches", "input_size"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        kw["extra"] = tuple(tuple(e) for e in kw.get("extra") or ())
        kw["dims"] = tuple((str(n), int(v)) for n, v in kw.get("dims") or ())
        return cls(**kw)
