"""Checkpoints a user can hold: model spec, weights, zero-group masks, config, metrics, report.

Only plain data and tensors go in, so `torch.load(..., weights_only=True)` reads them: a
checkpoint never executes code on load. Writes go to a temporary file that is renamed, so an
interrupted save never leaves half a checkpoint under the real name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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
KINDS = ("pretrained", "sparse", "unstructured")  # unstructured: the baseline at the sparse model's nonzeros
# What torch.load(weights_only=True) reads back: anything else would make a file load_checkpoint refuses.
_SCALARS = (str, int, float, bool, type(None))


@dataclass
class Checkpoint:
    kind: str  # "pretrained" | "sparse"
    model: ModelSpec
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    # A thinned model's plan (ThinPlan.to_dict()): state_dict and masks then hold the thinned tensors.
    thin: dict[str, Any] = field(default_factory=dict)

    def thin_plan(self):
        from .thin import ThinPlan

        return ThinPlan.from_dict(self.thin) if self.thin else None

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in the model's own architecture: a thinned checkpoint's deleted channels come back as
        exact zeros (what the masked model held there), so export, surgery and bench see the model as trained."""
        plan = self.thin_plan()
        return expand_tensors(self.state_dict, plan) if plan is not None else self.state_dict

    def build(self, *, thinned: bool = False) -> nn.Module:
        """The model with these weights (eval mode): in its own architecture with zeros where channels were
        deleted, or, with `thinned`, the smaller model training ran on."""
        plan = self.thin_plan()
        if thinned and plan is not None:
            from .thin import rebuild

            model = rebuild(self.model, plan)
            load_weights(model, self.state_dict, source=f"thinned checkpoint of {self.model.name}")
            return model.eval()
        model = build_model(self.model)
        load_weights(model, self.dense_state_dict(), source=f"checkpoint of {self.model.name}")
        return model.eval()


def expand_tensors(tensors: Mapping[str, torch.Tensor], plan) -> dict[str, torch.Tensor]:
    """Thinned tensors put back at their full shapes, zeros where the plan deleted (slice_tensors' inverse
    up to the deleted values, which were zero in the masked model)."""
    out = {}
    for name, t in tensors.items():
        dims = plan.keep.get(name)
        if not dims or not isinstance(t, torch.Tensor) or t.dim() != len(plan.shapes[name]):
            out[name] = t
            continue
        cur = t
        for d in sorted(dims):
            shape = list(cur.shape)
            shape[d] = plan.shapes[name][d]
            full = torch.zeros(shape, dtype=cur.dtype, device=cur.device)
            full.index_copy_(d, torch.as_tensor(dims[d], dtype=torch.long, device=cur.device), cur)
            cur = full
        out[name] = cur
    return out


def _check_plain(where: str, value: Any) -> None:
    """CheckpointError unless `value` is plain data (scalars, tensors, lists, tuples, sets, dicts)."""
    if type(value) in _SCALARS or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple, set):
        for i, v in enumerate(value):
            _check_plain(f"{where}[{i}]" if type(value) is not set else f"an item of {where}", v)
        return
    if type(value) is dict:
        for k, v in value.items():
            if type(k) not in _SCALARS:
                raise CheckpointError(f"{where} has a key of type {type(k).__name__}; a checkpoint holds only "
                                      "str, int, float, bool or None keys.")
            _check_plain(f"{where}[{k!r}]", v)
        return
    raise CheckpointError(f"{where} is a {type(value).__name__}; a checkpoint holds only plain data (str, int, float, "
                          "bool, None, tensors, and lists, tuples, sets or dicts of them), so convert it first.")


def _check_tensors(where: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise CheckpointError(f"the checkpoint's {where} must map names to tensors, got {type(value).__name__}.")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"the checkpoint's {where} must map str names to tensors; "
                                  f"{k!r} holds a {type(v).__name__}.")


def _check_saveable(ckpt: Checkpoint) -> None:
    """Refuse what load_checkpoint would refuse, before anything is written."""
    if not isinstance(ckpt, Checkpoint):
        raise CheckpointError(f"save_checkpoint takes a Checkpoint, got {type(ckpt).__name__}.")
    if ckpt.kind not in KINDS:
        raise CheckpointError(f"a checkpoint's kind must be one of {', '.join(KINDS)}, got {ckpt.kind!r}.")
    if not isinstance(ckpt.model, ModelSpec):
        raise CheckpointError(f"a checkpoint's model must be a ModelSpec, got {type(ckpt.model).__name__}.")
    _check_tensors("state_dict", ckpt.state_dict)
    _check_tensors("masks", ckpt.masks)
    unknown = [k for k in ckpt.masks if k not in ckpt.state_dict]
    if unknown:
        raise CheckpointError(f"the checkpoint's masks name {unknown[0]}, which its state_dict lacks.")
    if ckpt.thin:
        ckpt.thin_plan()  # CheckpointError for a malformed plan
    for name in ("config", "metrics", "report", "thin"):
        value = getattr(ckpt, name)
        if not isinstance(value, Mapping):
            raise CheckpointError(f"the checkpoint's {name} must be a dict, got {type(value).__name__}.")
        _check_plain(name, dict(value))


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write `ckpt` so that load_checkpoint reads it back; CheckpointError for contents it could not."""
    _check_saveable(ckpt)
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
        "thin": ckpt.thin,
    }, path)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_failure(path: Path, exc: BaseException, what: str = "a readable checkpoint") -> str:
    """Why torch.load(weights_only=True) refused `path`, in one sentence of ours.

    torch's own text is several paragraphs of advice, some of it to load the file with code execution on;
    sslcompress never does that, so only the refused object is named.
    """
    text = _ANSI.sub("", str(exc))
    if "Weights only load failed" in text:
        found = _REFUSED_GLOBAL.search(text)
        held = f" ({found.group(1)})" if found else ""
        return (f"{path} is not {what}: it holds pickled Python objects{held}, which sslcompress never "
                "unpickles (that could run code); save the weights with torch.save(model.state_dict(), PATH) "
                "and give that file")
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    first = re.split(r"(?<=\.)\s", first)[0][:160].rstrip(".")  # its first sentence is the fact
    return f"{path} is not {what}: corrupt or truncated ({type(exc).__name__}: {first})"


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(load_failure(path, exc)) from exc


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
            thin=dict(raw.get("thin") or {}),
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
        return ckpt.dense_state_dict(), ckpt
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
