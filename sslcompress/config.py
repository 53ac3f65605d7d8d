"""Options of each stage as frozen dataclasses; a TOML recipe fills them, flags override.

A recipe looks like:

    model = "resnet20"
    data = "cifar10:../shared/data/cifar10/cifar10_jpeg_q75.npz"
    structures = ["depth"]
    [lambdas]
    depth = 0.007
    [sparsify]
    epochs = 30
    lr = 0.1
    [finetune]
    epochs = 10
    lr = 0.01
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .finetune.groups import KINDS, parse_kinds

SCHEDULES = ("cosine", "step", "constant")
METHODS = ("ssl", "l1")
SOLVERS = ("proximal", "subgradient")


@dataclass(frozen=True)
class TrainOptions:
    """One training phase."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"

    def check(self, phase: str) -> None:
        if self.epochs < 0:
            raise ConfigError(f"{phase}.epochs must be >= 0, got {self.epochs}")
        if self.batch_size <= 0:
            raise ConfigError(f"{phase}.batch_size must be > 0, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"{phase}.lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{phase}.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"{phase}.weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{phase}.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


@dataclass(frozen=True)
class RunOptions:
    """What every stage shares: model, data, where results go."""

    model: str | None = None  # None: the --weights checkpoint's model, else lenet5
    data: str = "digits"
    weights: str | None = None
    out: str = "runs/default"
    seed: int = 0
    device: str = "cpu"
    limit_train: int | None = None
    limit_test: int | None = None
    eval_batch_size: int = 256
    threads: int | None = None  # torch intra-op threads; None leaves torch's default


@dataclass(frozen=True)
class PretrainConfig:
    run: RunOptions = field(default_factory=RunOptions)
    train: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=10, lr=0.02))

    def check(self) -> PretrainConfig:
        self.train.check("pretrain")
        return self


@dataclass(frozen=True)
class FinetuneConfig:
    run: RunOptions = field(default_factory=RunOptions)
    method: str = "ssl"
    structures: tuple[str, ...] = ("filter", "channel")
    lambdas: dict[str, float] = field(default_factory=dict)  # per structure; missing ones use `strength`
    strength: float = 0.3
    solver: str = "proximal"
    threshold: float = 1e-4  # the paper's zeroing threshold for the subgradient solver
    weighting: str = "none"
    target_flops: float | None = None
    pretrain: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=10, lr=0.02))
    # A constant lr while sparsifying: the proximal threshold is lr * lambda, and a decaying lr
    # would stop the pruning in the last epochs.
    sparsify: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=12, lr=0.02, weight_decay=0.0,
                                                                        schedule="constant"))
    finetune: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=6, lr=0.01, weight_decay=0.0))
    resume: bool = False

    def lambda_for(self, kind: str) -> float:
        return float(self.lambdas.get(kind, self.strength))

    def check(self) -> FinetuneConfig:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        parse_kinds(self.structures)
        for kind, lam in {**self.lambdas, "strength": self.strength}.items():
            if kind != "strength" and kind not in KINDS:
                raise ConfigError(f"lambda given for unknown structure {kind!r}; choose from {', '.join(KINDS)}")
            if not (lam >= 0 and math.isfinite(lam)):
                raise ConfigError(f"lambda for {kind} must be a non-negative number, got {lam}")
        if self.target_flops is not None and not 0 < self.target_flops <= 1:
            raise ConfigError(f"target FLOPs fraction must be in (0, 1], got {self.target_flops}")
        if self.target_flops is not None and self.method != "ssl":
            raise ConfigError("--target-flops needs --method ssl: non-structured zeros remove no MACs")
        if self.threshold < 0:
            raise ConfigError(f"threshold must be >= 0, got {self.threshold}")
        for phase in ("pretrain", "sparsify", "finetune"):
            getattr(self, phase).check(phase)
        return self


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The TOML recipe as a dict, with one clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} not found")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {p} is not valid TOML ({exc})") from exc


def _replace(obj, values: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}")
    return dataclasses.replace(obj, **values)


def build_config(cls, recipe: dict[str, Any] | None, overrides: dict[str, Any]):
    """Defaults <- recipe <- command-line overrides (None means 'not given')."""
    merged: dict[str, Any] = {}
    for source in (recipe or {}, {k: v for k, v in overrides.items() if v is not None}):
        for key, value in source.items():
            if isinstance(value, dict) and key != "lambdas":
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    cfg = cls()
    run_keys = {f.name for f in dataclasses.fields(RunOptions)}
    phase_keys = {f.name for f in dataclasses.fields(cls)} - {"run"}
    run_values = {k: merged.pop(k) for k in list(merged) if k in run_keys}
    cfg = dataclasses.replace(cfg, run=_replace(cfg.run, run_values, "run options"))
    top: dict[str, Any] = {}
    for key, value in merged.items():
        if key not in phase_keys:
            raise ConfigError(f"unknown option {key!r}")
        current = getattr(cfg, key)
        if isinstance(current, TrainOptions):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a table of training options")
            top[key] = _replace(current, value, f"[{key}]")
        elif key == "structures":
            top[key] = parse_kinds(value)
        elif key == "lambdas":
            if not isinstance(value, dict):
                raise ConfigError("lambdas must be a table such as {filter = 0.1}")
            top[key] = {str(k): float(v) for k, v in value.items()}
        else:
            top[key] = value
    try:
        return dataclasses.replace(cfg, **top).check()
    except TypeError as exc:
        raise ConfigError(f"bad option value ({exc})") from exc


def to_plain(cfg) -> dict[str, Any]:
    """Config as plain data (for checkpoints loaded with weights_only=True and for JSON)."""
    d = dataclasses.asdict(cfg)
    if "structures" in d:
        d["structures"] = list(d["structures"])
    return d


# The command-line flag behind each option of a finetune run, for messages that name what the user typed;
# options without a flag are named by their recipe key.
FLAGS = {
    "run.model": "--model", "run.data": "--data", "run.weights": "--weights", "run.seed": "--seed",
    "run.limit_train": "--limit-train", "run.limit_test": "--limit-test", "method": "--method",
    "structures": "-s/--structures", "lambdas": "--lambda", "strength": "--strength", "solver": "--solver",
    "threshold": "--threshold", "weighting": "--weighting", "target_flops": "--target-flops",
    "pretrain.epochs": "--pretrain-epochs", "sparsify.epochs": "--sparsify-epochs",
    "finetune.epochs": "--finetune-epochs", "sparsify.lr": "--lr", "finetune.lr": "--finetune-lr",
    "pretrain.batch_size": "--batch-size", "sparsify.batch_size": "--batch-size",
    "finetune.batch_size": "--batch-size",
}

# Options that may change between an interrupted run and its --resume: where it runs and how fast,
# never what it computes.
RESUME_FREE = ("resume", "run.out", "run.device", "run.threads", "run.eval_batch_size")


def resume_fingerprint(cfg: FinetuneConfig) -> dict[str, Any]:
    """The options a resumed run must share with the run it continues, flat as {'sparsify.lr': 0.02, ...}."""
    flat: dict[str, Any] = {}
    for key, value in to_plain(cfg).items():
        if isinstance(value, dict) and key != "lambdas":
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    for key in RESUME_FREE:
        flat.pop(key, None)
    if flat.get("run.weights"):
        flat["run.weights"] = str(Path(flat["run.weights"]).expanduser().resolve())
    if isinstance(flat.get("lambdas"), dict):
        flat["lambdas"] = {str(k): float(v) for k, v in sorted(flat["lambdas"].items())}
    return flat


def _shown(value: Any) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()) or "(none)"
    return str(value)


def check_resume_fingerprint(stored: Any, current: dict[str, Any], where: str) -> None:
    """ConfigError naming the first option whose value differs from the one the interrupted run used."""
    if not isinstance(stored, dict):
        raise ConfigError(f"--resume: {where} does not record the options of its run (written by an older "
                          "sslcompress); start over without --resume")
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if old != new:
            flag = FLAGS.get(key, f"the recipe key {key}")
            raise ConfigError(f"--resume: the interrupted run used {flag} {_shown(old)}, this one gives "
                              f"{_shown(new)}; resume with the options it started with, or start over "
                              "without --resume")
