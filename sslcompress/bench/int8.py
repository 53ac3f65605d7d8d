"""INT8 on top of structure (`bench --int8`): the dense and the structured model quantized, and how the two
speed-ups compound.

    dense-int8       the dense model after ORT's static INT8 quantization (QDQ), as `sslcompress quantize` does it
    structured-int8  the structured (compact) model, quantized the same way on the same calibration images

Speed-ups are ratios of medians over the same rounds, so they multiply exactly:
structured-int8 over dense = (structured over dense) x (structured-int8 over structured).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import UnsupportedModelError
from ..runtime.timing import Timing
from .variants import (
    DENSE,
    DENSE_INT8,
    STRUCTURED,
    STRUCTURED_INT8,
    Variant,
    VariantSet,
    input_shape,
    require_image_input,
)

COMPOUNDING_HEAD = "INT8 on top of structure:"  # how the compounding note starts (the terminal shows it bold)


@dataclass(frozen=True)
class Compounding:
    """At one (provider, threads, batch): structure and INT8 as factors of the speed-up over dense."""

    provider: str
    threads: int
    batch: int
    structure: float  # structured over dense
    int8: float  # structured-int8 over structured
    total: float  # structured-int8 over dense: structure x int8
    dense_int8: float  # dense-int8 over dense, for comparison


def add_int8(variants: VariantSet, data: str, calibration: int, *, seed: int = 0,
             say: Callable[[str], None] | None = None) -> tuple[VariantSet, list[str]]:
    """The set with dense-int8 and structured-int8 after the others, and notes from the quantizer.

    Both are calibrated on one array of `calibration` training images of `data`, so they differ only in
    the model they quantize.
    """
    from ..quantize import calibration_images, quantize_qdq

    say = say or (lambda _msg: None)
    require_image_input(variants.dense.model, "--int8 quantizes")
    say(f"loading {calibration} calibration images of {data}")
    images = calibration_images(data, input_shape(variants.dense.model), calibration, seed)
    added, notes = [], []
    for name, base in ((DENSE_INT8, variants.dense), (STRUCTURED_INT8, variants.structured)):
        say(f"quantizing the {base.name} model to INT8")
        try:
            model, skipped = quantize_qdq(base.model, images)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"--int8, the {base.name} model: {exc}") from exc
        added.append(Variant(name, model, f"{base.name}, INT8 (QDQ) calibrated on {len(images)} training images"
                                          f" of {data}", quantized_from=base.name))
        notes += [f"{name}: {n}" for n in skipped]
    return variants.plus(*added), notes


def compounding(timings: Sequence[Timing]) -> list[Compounding]:
    """The factors at every setting that timed dense, structured and both INT8 variants."""
    by_setting: dict[tuple[str, int, int], dict[str, Timing]] = {}
    for t in timings:
        by_setting.setdefault((t.provider, t.threads, t.batch), {})[t.variant] = t
    out = []
    for (provider, threads, batch), ts in by_setting.items():
        if not {DENSE, STRUCTURED, DENSE_INT8, STRUCTURED_INT8} <= set(ts):
            continue
        out.append(Compounding(provider, threads, batch, structure=ts[STRUCTURED].speedup,
                               int8=ts[STRUCTURED].median_s / ts[STRUCTURED_INT8].median_s,
                               total=ts[STRUCTURED_INT8].speedup, dense_int8=ts[DENSE_INT8].speedup))
    return out


def compounding_note(factors: Sequence[Compounding]) -> str | None:
    """One line: structured-int8 over dense as the product of its two factors, per setting."""
    if not factors:
        return None
    parts = [f"{c.provider} {c.threads} thread(s) batch {c.batch}: {c.total:.2f}x = {c.structure:.2f}x x"
             f" {c.int8:.2f}x (dense-int8 {c.dense_int8:.2f}x)" for c in factors]
    return (f"{COMPOUNDING_HEAD} structured-int8 over dense = (structured over dense) x (structured-int8"
            " over structured); dense-int8 over dense beside it. " + "; ".join(parts) + ".")


def int8_note(config_data: str, calibration: int) -> str:
    return (f"dense-int8 and structured-int8: ONNX Runtime's static INT8 quantization (QDQ) of the dense and the"
            f" structured model, as `sslcompress quantize` does it: int8 weights per output channel, uint8"
            f" activations with MinMax ranges calibrated on up to {calibration} training images of {config_data};"
            " ONNX Runtime fuses each QDQ pair it has an integer kernel for (QLinearConv, QLinearMatMul).")
