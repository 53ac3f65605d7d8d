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
from .group_kinds import KINDS, parse_kinds

SCHEDULES = ("cosine", "step", "constant")
METHODS = ("ssl", "l1")
SOLVERS = ("proximal", "subgradient")
WEIGHTINGS = ("none", "sqrt", "macs", "latency")
IMPORTANCES = ("norm", "taylor")
# Every float option ends up in float32 arithmetic (lr * gradient, lr * lambda): a larger value overflows there.
FLOAT32_MAX = 3.4028234663852886e38
SEED_MAX = 2**32 - 1  # numpy's seeding takes 32 bits


def option_name(key: str) -> str:
    """How a message names an option: its recipe key, with the command-line flag behind it where there is one."""
    flag = FLAGS.get(key)
    if key.startswith("lambdas."):
        flag = f"--lambda {key.removeprefix('lambdas.')}=VALUE"
    key = key.removeprefix("run.")  # a recipe gives run options at its top level
    return f"{key} ({flag})" if flag else key


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(key: str, value: Any, low: int, high: int | None = None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{option_name(key)} must be a whole number {bound}, got {value!r}")


def check_number(key: str, value: Any, low: float = 0.0, high: float = FLOAT32_MAX, *, low_open: bool = False,
                 high_open: bool = False, optional: bool = False) -> None:
    """A real number in the interval (a bool or a string is not one; NaN and infinity never are)."""
    if value is None and optional:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        if low == 0 and high == FLOAT32_MAX and not high_open:
            want = f"a {'positive' if low_open else 'non-negative'} number (at most {FLOAT32_MAX:.3g})"
        else:
            want = f"a number in {'(' if low_open else '['}{low:.3g}, {high:.3g}{')' if high_open else ']'}"
        raise ConfigError(f"{option_name(key)} must be {want}, got {value!r}")


def check_text(key: str, value: Any, choices: tuple[str, ...] | None = None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or (choices is not None and value not in choices):
        want = f"one of {', '.join(choices)}" if choices else "a non-empty string"
        raise ConfigError(f"{option_name(key)} must be {want}, got {value!r}")


def check_device(key: str, device: Any) -> None:
    """cpu, or cuda[:N] on a torch that sees that GPU."""
    check_text(key, device)
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"{option_name(key)} must be cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option_name(key)} {device} asked for CUDA, but this torch sees no CUDA GPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"{option_name(key)} {device}: this machine has {torch.cuda.device_count()} CUDA "
                              "GPU(s), numbered from 0")


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
        check_int(f"{phase}.epochs", self.epochs, 0)
        check_int(f"{phase}.batch_size", self.batch_size, 1)
        check_number(f"{phase}.lr", self.lr, low_open=True)
        check_number(f"{phase}.momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_number(f"{phase}.weight_decay", self.weight_decay)
        check_text(f"{phase}.schedule", self.schedule, SCHEDULES)


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

    def check(self) -> None:
        check_text("run.model", self.model, optional=True)
        check_text("run.data", self.data)
        check_text("run.weights", self.weights, optional=True)
        check_text("run.out", self.out)
        check_int("run.seed", self.seed, 0, SEED_MAX)
        check_device("run.device", self.device)
        check_int("run.limit_train", self.limit_train, 1, optional=True)
        check_int("run.limit_test", self.limit_test, 1, optional=True)
        check_int("run.eval_batch_size", self.eval_batch_size, 1)
        check_int("run.threads", self.threads, 1, optional=True)


@dataclass(frozen=True)
class PretrainConfig:
    run: RunOptions = field(default_factory=RunOptions)
    train: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=10, lr=0.02))
    resume: bool = False

    def check(self) -> PretrainConfig:
        _check_parts(self, ("run", RunOptions), ("train", TrainOptions))
        self.run.check()
        self.train.check("train")
        if not isinstance(self.resume, bool):
            raise ConfigError(f"resume must be true or false, got {self.resume!r}")
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
    weighting: str = "none"  # build_config makes it "latency" where target_latency is given and it is not
    target_flops: float | None = None  # at most this fraction of the dense MACs remains
    target_params: float | None = None  # at most this fraction of the parameters remains
    # Widths kept are multiples of this (None or 1: any width); "auto": the channel step the latency table
    # of the latency_* session shows (resolved when the run starts, see finetune/latency_budget.py).
    align: int | str | None = None
    # Each width that carries the network (zeroing it whole leaves a constant output: a residual trunk, a layer
    # of a plain stack) keeps at least this fraction of its channels, its strongest: group Lasso never thins
    # those, nor does the ranking that lands a budget. Widths a residual branch bypasses may still empty (the
    # branch goes). 0: only connectivity is kept (a trunk may fall to one channel).
    min_keep: float = 0.1
    # How the ranking that lands a budget scores a group: "norm", its L2 norm over the mean of the groups it
    # competes with (its own width); "taylor", the loss its removal costs to first order, (gradient . weight)^2
    # averaged over the recent steps, one scale for the whole network. See Sparsifier._ranked.
    importance: str = "taylor"
    # At most this many milliseconds per run, as the latency table of `sslcompress profile` predicts it for
    # the session below (provider, intra-op threads, batch); `latency_table` None: the default cache file.
    target_latency: float | None = None
    latency_provider: str = "cpu"
    latency_threads: int = 1
    latency_batch: int = 1
    latency_table: str | None = None
    budget_every: int | None = None  # optimizer steps between budget checks; None: 25, at least 4 an epoch
    # Fine-tune the thinned model (zero channels sliced out of the torch model): the same function, less time.
    thin: bool = True
    # With a budget, zero the weakest groups at each check where lambda lags the budget's schedule, so the
    # budget is reached step by step during sparsify rather than in one cut at its end.
    pace: bool = True
    pretrain: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=10, lr=0.02))
    # A constant lr while sparsifying: the proximal threshold is lr * lambda, and a decaying lr
    # would stop the pruning in the last epochs.
    sparsify: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=12, lr=0.02, weight_decay=0.0,
                                                                        schedule="constant"))
    finetune: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=6, lr=0.01, weight_decay=0.0))
    resume: bool = False

    def lambda_for(self, kind: str) -> float:
        return float(self.lambdas.get(kind, self.strength))

    def targets(self) -> dict[str, float]:
        """The budget asked for: the most of the dense MACs and/or parameters that may remain."""
        asked = {"macs": self.target_flops, "params": self.target_params}
        return {k: float(v) for k, v in asked.items() if v is not None}

    def check(self) -> FinetuneConfig:
        _check_parts(self, ("run", RunOptions), *((p, TrainOptions) for p in ("pretrain", "sparsify", "finetune")))
        self.run.check()
        check_text("method", self.method, METHODS)
        check_text("solver", self.solver, SOLVERS)
        check_text("weighting", self.weighting, WEIGHTINGS)
        parse_kinds(self.structures)
        if not isinstance(self.lambdas, dict):
            raise ConfigError(f"{option_name('lambdas')} must map structures to numbers such as {{filter = 0.1}}, "
                              f"got {self.lambdas!r}")
        for kind, lam in self.lambdas.items():
            if kind not in KINDS:
                raise ConfigError(f"lambda given for unknown structure {kind!r}; choose from {', '.join(KINDS)}")
            check_number(f"lambdas.{kind}", lam)
        check_number("strength", self.strength)
        check_number("target_flops", self.target_flops, 0.0, 1.0, low_open=True, optional=True)
        check_number("target_params", self.target_params, 0.0, 1.0, low_open=True, optional=True)
        if self.align != "auto":
            check_int("align", self.align, 1, 4096, optional=True)
        check_number("min_keep", self.min_keep, 0.0, 1.0)
        check_text("importance", self.importance, IMPORTANCES)
        check_number("target_latency", self.target_latency, low_open=True, optional=True)
        check_text("latency_provider", self.latency_provider, ("cpu", "cuda"))
        check_int("latency_threads", self.latency_threads, 1)
        check_int("latency_batch", self.latency_batch, 1)
        if self.latency_table is not None and not isinstance(self.latency_table, str):
            raise ConfigError(f"{option_name('latency_table')} must be a path, got {self.latency_table!r}")
        check_int("budget_every", self.budget_every, 1, optional=True)
        for key in ("thin", "pace"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{option_name(key)} must be true or false, got {getattr(self, key)!r}")
        for key, flag, what in (("target_flops", "--target-flops", "MACs"),
                                ("target_params", "--target-params", "parameters"),
                                ("target_latency", "--target-latency", "time"),
                                ("align", "--align", "widths")):
            if getattr(self, key) is not None and self.method != "ssl":
                raise ConfigError(f"{flag} needs --method ssl: non-structured zeros remove no {what}")
        if (self.align == "auto" or (self.align or 1) > 1) \
                and not {"filter", "channel", "neuron"} & set(parse_kinds(self.structures)):
            raise ConfigError(f"--align {self.align} needs filter or channel (or neuron) among the structures (-s): "
                              f"{','.join(self.structures)} never change a width")
        check_number("threshold", self.threshold)
        if not isinstance(self.resume, bool):
            raise ConfigError(f"resume must be true or false, got {self.resume!r}")
        for phase in ("pretrain", "sparsify", "finetune"):
            getattr(self, phase).check(phase)
        return self


def _check_parts(cfg, *parts: tuple[str, type]) -> None:
    """Each part of a config is the dataclass it should be (the Python API may hand anything)."""
    for name, cls in parts:
        if not isinstance(getattr(cfg, name), cls):
            raise ConfigError(f"{type(cfg).__name__}.{name} must be a {cls.__name__}, "
                              f"got {type(getattr(cfg, name)).__name__}")


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
                table = merged.setdefault(key, {})
                if not isinstance(table, dict):
                    raise ConfigError(f"{key} must be a table of options such as [{key}], got {table!r}")
                table.update(value)
            else:
                merged[key] = value
    if cls is FinetuneConfig and merged.get("target_latency") is not None:
        # A latency target weighs the groups by the latency they save unless a weighting is asked for.
        merged.setdefault("weighting", "latency")
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
            top[key] = {str(k): v for k, v in value.items()}  # check() wants a number for each
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
    "target_params": "--target-params", "align": "--align", "budget_every": "--budget-every",
    "min_keep": "--min-keep", "importance": "--importance",
    "target_latency": "--target-latency", "latency_provider": "--latency-provider",
    "latency_threads": "--latency-threads", "latency_batch": "--latency-batch", "latency_table": "--latency-table",
    "thin": "--thin/--no-thin", "pace": "--pace/--no-pace",
    "pretrain.epochs": "--pretrain-epochs", "sparsify.epochs": "--sparsify-epochs",
    "finetune.epochs": "--finetune-epochs", "sparsify.lr": "--lr", "finetune.lr": "--finetune-lr",
    "pretrain.batch_size": "--batch-size", "sparsify.batch_size": "--batch-size",
    "finetune.batch_size": "--batch-size", "run.out": "--out", "run.device": "--device",
    "run.threads": "--threads", "train.epochs": "--epochs", "train.lr": "--lr", "train.batch_size": "--batch-size",
}

# Options that may change between an interrupted run and its --resume: where it runs and how fast,
# never what it computes.
RESUME_FREE = ("resume", "run.out", "run.device", "run.threads", "run.eval_batch_size")
# Options added after resume states were first written, with the value a run from before computed as: a state
# that does not record one continues when the run gives that value.
RESUME_ADDED = {"importance": "norm"}


def resume_fingerprint(cfg: FinetuneConfig | PretrainConfig) -> dict[str, Any]:
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
        old, new = stored.get(key, RESUME_ADDED.get(key)), current.get(key)
        if old != new:
            flag = FLAGS.get(key, f"the recipe key {key}")
            raise ConfigError(f"--resume: the interrupted run used {flag} {_shown(old)}, this one gives "
                              f"{_shown(new)}; resume with the options it started with, or start over "
                              "without --resume")
