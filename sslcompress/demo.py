"""The three stages on the embedded default, end to end: what `sslcompress demo` runs.

Fine-tune (LeNet on the bundled digits, pretraining the baseline first), export and cut, train the
unstructured baseline (the same nonzeros per layer, by magnitude, then the same fine-tuning), then bench
the dense, unstructured and structured models, and the dense and the structured model in INT8, on the CPU. Each stage is a function, so the CLI can show its
progress; the files land in one folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import VerificationError


@dataclass(frozen=True)
class DemoPaths:
    out: Path

    @property
    def sparse(self) -> Path:
        return self.out / "sparse.pt"

    @property
    def pretrained(self) -> Path:
        return self.out / "pretrained.pt"

    @property
    def unstructured(self) -> Path:
        from .finetune.unstructured import UNSTRUCTURED

        return self.out / UNSTRUCTURED

    @property
    def uncut(self) -> Path:
        return self.out / "uncut.onnx"

    @property
    def compact(self) -> Path:
        return self.out / "compact.onnx"

    @property
    def surgery_report(self) -> Path:
        return self.out / "surgery.json"

    @property
    def bench_json(self) -> Path:
        return self.out / "bench.json"

    @property
    def bench_markdown(self) -> Path:
        return self.out / "bench.md"

    @property
    def bench_plot(self) -> Path:
        return self.out / "bench.png"


# What `demo --model` offers: the built-in each name trains and what the defaults do not already say. The
# ViT learns MLP neurons and attention heads (its convs are the patch embedding alone) to half the MACs; from
# scratch on 1,437 digits it needs more steps than a CNN (10 epochs at lr 0.02: 45% top-1, 30 epochs: 88%).
DEMO_MODELS: dict[str, dict[str, Any]] = {
    "lenet5": {"model": "lenet5"},
    "resnet20": {"model": "resnet20"},
    "vit": {"model": "vit_tiny", "structures": ["neuron", "head"], "target_flops": 0.5,
            "pretrain": {"epochs": 30, "lr": 0.02}},
}


def finetune_config(paths: DemoPaths, model: str = "lenet5", quick: bool = False):
    """The finetune defaults; `quick` is a smoke-test size (one epoch per phase, few images, and a
    MAC target so that one epoch of sparsify still leaves something to cut)."""
    from .config import FinetuneConfig, build_config

    overrides: dict[str, Any] = {"out": str(paths.out), **DEMO_MODELS[model]}
    if quick:
        overrides.update({"limit_train": 256, "limit_test": 128, "pretrain": {"epochs": 1},
                          "sparsify": {"epochs": 1}, "finetune": {"epochs": 1}, "target_flops": 0.4})
    return build_config(FinetuneConfig, None, overrides)


def export_stage(paths: DemoPaths, shape_lowering: str = "predict"):
    """Export the sparse checkpoint, cut it and write the uncut and the compact model and the report."""
    from .finetune.checkpoint import load_checkpoint
    from .io import atomic_write_json
    from .surgery.compress import compress
    from .surgery.export import export_onnx, save_onnx

    ckpt = load_checkpoint(paths.sparse)
    exported = export_onnx(ckpt.build(), ckpt.model.input_shape, dynamic_batch=True)
    result = compress(exported.model, shape_lowering=shape_lowering)
    if not result.verification.passed:
        v = result.verification
        raise VerificationError(f"the compact model differs from the uncut one by {v.max_abs:.3g}; nothing written")
    save_onnx(exported.model, paths.uncut)
    save_onnx(result.model, paths.compact)
    atomic_write_json(result.report, paths.surgery_report)
    return result


def unstructured_stage(paths: DemoPaths, on_event=None):
    """The unstructured baseline at the sparse model's nonzeros, trained as the sparse model was fine-tuned."""
    from .finetune.unstructured import train_unstructured

    return train_unstructured(paths.pretrained, paths.sparse, paths.unstructured, on_event=on_event)


# Training images of the digits that calibrate the INT8 variants: few, since the ranges of a small CNN settle
# early and quantizing stays a second or two of the demo.
CALIBRATION = {"default": 128, "quick": 32}


def bench_config(paths: DemoPaths, quick: bool = False, threads: tuple[int, ...] = (1,)):
    """The bench of all five: dense, unstructured, structured, dense-int8 and structured-int8."""
    from .bench.config import BenchConfig

    return BenchConfig(target=str(paths.out), structured=str(paths.compact), data="digits",
                       threads=threads, repeat=3 if quick else None, warmup=1 if quick else 5,
                       memory=not quick, data_limit=128 if quick else 1000, int8=True,
                       calibration=CALIBRATION["quick" if quick else "default"])
