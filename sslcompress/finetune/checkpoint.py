"""Checkpoints a user can hold: model spec, weights, zero-group masks, config, metrics, report.

Only plain data and tensors go in, so `torch.load(..., weights_only=True)` reads them: a
checkpoint never executes code on load. Writes go to a temporary file that is renamed, so an
interrupted save never leaves half a checkpoint under the real name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..io import atomic_torch_save
from ..models import ModelSpec, build_model

FORMAT = "sslcompress-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    kind: str  # "pretrained" | "sparse"
    model: ModelSpec
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The model with these weights (eval mode)."""
        model = build_model(self.model)
        load_weights(model, self.state_dict, source=f"checkpoint of {self.model.name}")
        return model.eval()


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    atomic_torch_save({
        "format": FORMAT,
        "version": VERSION,
        "kind": ckpt.kind,
        "model": ckpt.model.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "masks": {k: v.cpu() for k, v in ckpt.masks.items()},
        "config": ckpt.config,
        "metrics": ckpt.metrics,
        "report": ckpt.report,
    }, path)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path} is not a readable checkpoint: corrupt, truncated, or holding objects that "
                              f"weights-only loading refuses ({type(exc).__name__}: {first})") from exc


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Our own checkpoint; CheckpointError for anything else."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} not found")
    raw = _torch_load(p)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not an sslcompress checkpoint (a bare state_dict goes to --weights)")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{p} has checkpoint version {raw.get('version')}, this sslcompress reads {VERSION}")
    try:
        return Checkpoint(
            kind=str(raw["kind"]),
            model=ModelSpec.from_dict(raw["model"]),
            state_dict=dict(raw["state_dict"]),
            masks=dict(raw.get("masks") or {}),
            config=dict(raw.get("config") or {}),
            metrics=dict(raw.get("metrics") or {}),
            report=dict(raw.get("report") or {}),
        )
    except Exception as exc:
        raise CheckpointError(f"{p} is a damaged sslcompress checkpoint ({exc})") from exc


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Checkpoint | None]:
    """Weights from our checkpoint or from a bare state_dict file (also {'state_dict': ...})."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file {p} not found")
    raw = _torch_load(p)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        ckpt = load_checkpoint(p)
        return ckpt.state_dict, ckpt
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{p} holds neither an sslcompress checkpoint nor a state_dict")
    # Weights saved from a DataParallel/DDP wrapper carry a 'module.' prefix.
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    return raw, None


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one sentence naming what does not fit (another architecture)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{k} has shape {tuple(state_dict[k].shape)}, the model wants {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise CheckpointError(f"{source} does not fit this model (another architecture?): {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)
