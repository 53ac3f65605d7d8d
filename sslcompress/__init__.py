"""sslcompress: Structured Sparsity Learning for CNNs, exact ONNX surgery, honest benchmarks.

The Python API for users with their own training loop (names load lazily, so the CLI starts fast):

    build_groups(model, input_shape, kinds)  -> list[ParamGroup]
    GroupLasso(model, groups, weighting)     penalty(), proximal_step(), zero_groups(), keep_masks()
    MaskSet(model, masks).attach()           frozen zeros through fine-tuning (apply_() after each step)
    count(model, input_shape)                dense and after-removal MACs / parameters
    save_checkpoint / load_checkpoint        the checkpoint the other commands read
    export_onnx(model, input_shape)          torch -> simplified ONNX (eval mode, onnxsim)
    compress(onnx_model_or_path)             exact surgery: compact model, report, verification
    register_rule(op_type, rule, domain=...)  teach the surgery an op of your own (see OpRule)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelSpec": "sslcompress.models",
    "build_model": "sslcompress.models",
    "load_data": "sslcompress.data",
    "KINDS": "sslcompress.finetune.groups",
    "ParamGroup": "sslcompress.finetune.groups",
    "Slice": "sslcompress.finetune.groups",
    "build_groups": "sslcompress.finetune.groups",
    "GroupLasso": "sslcompress.finetune.regularizer",
    "MaskSet": "sslcompress.finetune.masks",
    "count": "sslcompress.finetune.counting",
    "Counter": "sslcompress.finetune.counting",
    "Checkpoint": "sslcompress.finetune.checkpoint",
    "save_checkpoint": "sslcompress.finetune.checkpoint",
    "load_checkpoint": "sslcompress.finetune.checkpoint",
    "run_pretrain": "sslcompress.finetune.pipeline",
    "run_finetune": "sslcompress.finetune.pipeline",
    "export_onnx": "sslcompress.surgery.export",
    "compress": "sslcompress.surgery.compress",
    "register_rule": "sslcompress.surgery.ops",
    "OpRule": "sslcompress.surgery.ops",
    "PassThrough": "sslcompress.surgery.ops",
    "Unary": "sslcompress.surgery.ops",
    "Channels": "sslcompress.surgery.ops",
    "Decline": "sslcompress.surgery.ops",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sslcompress' has no attribute {name!r}")
