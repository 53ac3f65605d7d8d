"""What a bench run found, as frozen dataclasses that go to JSON and back unchanged."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .config import BenchConfig
from .memory import MemoryUse
from .modelstudy import LayerStudy
from .paper import PaperTable
from .timing import Timing
from .variants import ORDER, LayerNonzeros

FORMAT = "sslcompress-bench"
VERSION = 1

UNSTRUCTURED_NOTE = (
    "Stock ONNX Runtime runs the unstructured model with the same dense kernels as the dense model: its"
    " zeros are multiplied like any other weight, so expect about 1.0x. ORT has no sparse Conv, and sparse"
    " initializers are densified at load. Unstructured zeros pay only in a sparse kernel (the per-layer CSR"
    " study, --layers) and there only at high sparsity; removing whole channels (structured) pays everywhere.")


@dataclass(frozen=True)
class VariantInfo:
    """One variant's static numbers, its peak memory and its accuracy."""

    name: str
    source: str
    input_shape: tuple[int | None, ...]
    file_bytes: int  # the serialised ONNX model
    macs: int  # per image, of the Conv/Gemm/MatMul layers as they run (zeros included)
    parameters: int  # every initializer element
    nonzero_weights: int  # nonzero elements of the layer weights (biases not counted)
    layer_nonzeros: dict[str, int]  # per weight layer, by node name
    memory: MemoryUse | None = None
    accuracy: float | None = None  # top-1 on `accuracy_images` test images of the --data set
    accuracy_images: int | None = None
    path: str | None = None  # where it was written (--models-dir)
    # A transformer's units as the graph computes them: heads per attention, hidden neurons per MLP.
    units: dict[str, list[int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["input_shape"] = list(self.input_shape)
        d["layer_nonzeros"] = dict(self.layer_nonzeros)
        d["memory"] = self.memory.to_dict() if self.memory else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VariantInfo:
        kw = {f.name: d.get(f.name) for f in fields(cls)}
        kw["input_shape"] = tuple(d["input_shape"])
        kw["layer_nonzeros"] = dict(d["layer_nonzeros"])
        kw["memory"] = MemoryUse.from_dict(d["memory"]) if d.get("memory") else None
        return cls(**kw)


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    created: str  # UTC time the run started
    env: dict[str, Any]  # versions, CPUs, load average
    variants: tuple[VariantInfo, ...] = ()
    matching: tuple[LayerNonzeros, ...] = ()  # per layer: unstructured nonzeros and the structured target
    unmatched: tuple[str, ...] = ()  # structured layers with no dense layer of their name
    timings: tuple[Timing, ...] = ()
    layers: tuple[LayerStudy, ...] = ()
    layers_skipped: dict[str, str] | None = None
    paper: PaperTable | None = None
    notes: tuple[str, ...] = ()
    # The ONNX bytes of each variant when config.models_dir asks for them (not part of the JSON).
    models: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------ lookups
    def variant(self, name: str) -> VariantInfo:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def settings(self) -> list[tuple[str, int, int]]:
        """(provider, threads, batch) in the order they ran."""
        return list(dict.fromkeys((t.provider, t.threads, t.batch) for t in self.timings))

    def timing(self, variant: str, provider: str, threads: int, batch: int) -> Timing:
        for t in self.timings:
            if (t.variant, t.provider, t.threads, t.batch) == (variant, provider, threads, batch):
                return t
        raise KeyError((variant, provider, threads, batch))

    def variant_order(self) -> list[str]:
        names = [v.name for v in self.variants] or list(dict.fromkeys(t.variant for t in self.timings))
        # Known variants in their usual order (dense first); a stable sort keeps the others as they came.
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "config": self.config.to_dict(), "created": self.created,
            "env": self.env, "variants": [v.to_dict() for v in self.variants],
            "matching": [asdict(m) for m in self.matching], "unmatched": list(self.unmatched),
            "timings": [t.to_dict() for t in self.timings], "layers": [r.to_dict() for r in self.layers],
            "layers_skipped": self.layers_skipped, "paper": self.paper.to_dict() if self.paper else None,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        from ..errors import ConfigError

        if d.get("format") != FORMAT:
            raise ConfigError("not an sslcompress bench result")
        return cls(
            config=BenchConfig.from_dict(d["config"]), created=d["created"], env=dict(d["env"]),
            variants=tuple(VariantInfo.from_dict(v) for v in d["variants"]),
            matching=tuple(LayerNonzeros(**m) for m in d["matching"]), unmatched=tuple(d["unmatched"]),
            timings=tuple(Timing.from_dict(t) for t in d["timings"]),
            layers=tuple(LayerStudy.from_dict(r) for r in d["layers"]),
            layers_skipped=d.get("layers_skipped"),
            paper=PaperTable.from_dict(d["paper"]) if d.get("paper") else None, notes=tuple(d["notes"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> BenchResult:
        return cls.from_dict(json.loads(text))
