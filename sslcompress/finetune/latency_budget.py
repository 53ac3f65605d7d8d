"""Latency as a budget metric (`finetune --target-latency MS`) and the widths it likes (`--align auto`), read from
the table `sslcompress profile` built.

The budget's third metric beside MACs and parameters: the predicted milliseconds of the model as the weights
are now (sslcompress/latency/predict.py: each layer's measured op latency at the widths the count keeps,
calibrated by the whole dense model), as a fraction of the dense model's. The controller, pace and the final
ranking then steer it as they steer the MAC fraction. Prediction reads the dense model's layers, so a model
thinned during sparsify is predicted by its layers' names at the widths they keep.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..latency.key import current_key, default_path
from ..latency.predict import predict, predict_dense
from ..latency.step import ChannelStep, channel_step
from ..latency.table import LatencyTable, load_table
from .counting import ModelCount
from .structure import ModelStructure, analyze


@dataclass(frozen=True)
class LatencyBudget:
    table: LatencyTable
    structure: ModelStructure  # the dense model's: its layers name the table's entries
    dense_ms: float
    path: str

    def ms(self, counted: ModelCount) -> float:
        return predict(self.table, self.structure, counted)

    def fraction(self, counted: ModelCount) -> float:
        return self.ms(counted) / self.dense_ms


def _table(cfg, model_name: str, flag: str) -> tuple[LatencyTable, Path, str]:
    """The latency table of the options' session, the path it came from and the command that profiles it."""
    key = current_key(cfg.latency_provider, cfg.latency_threads, cfg.latency_batch)
    path = Path(cfg.latency_table) if cfg.latency_table else default_path(key)
    profile = (f"sslcompress profile --model {model_name} --provider {cfg.latency_provider} --threads "
               f"{cfg.latency_threads} --batch {cfg.latency_batch}" + (f" --table {path}" if cfg.latency_table else ""))
    if not path.is_file():
        raise ConfigError(f"{flag} needs a latency table of this machine and session, and there is none "
                          f"at {path}: run `{profile}` first")
    return load_table(path, key), path, profile


def resolve_align(cfg) -> tuple[Any, ChannelStep | None]:
    """The options with `--align auto` replaced by the channel step the latency table shows, and that reading
    (None where auto was not asked)."""
    if cfg.align != "auto":
        return cfg, None
    table, _, _ = _table(cfg, cfg.run.model or ("MODEL" if cfg.run.weights else "lenet5"), "--align auto")
    found = channel_step(table)
    return dataclasses.replace(cfg, align=found.step), found


def latency_budget(cfg, model: nn.Module, input_shape: tuple[int, ...], model_name: str) -> LatencyBudget | None:
    """The table for the options' session, read for the dense `model`; None without --target-latency. One
    sentence (ConfigError) when there is no table, it was measured elsewhere, or it lacks this model."""
    if cfg.target_latency is None:
        return None
    table, path, profile = _table(cfg, model_name, "--target-latency")
    structure = analyze(model, input_shape)
    try:
        dense_ms = predict_dense(table, structure)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (`{profile}`)") from exc
    if not dense_ms > 0:
        raise ConfigError(f"the latency table at {path} predicts {dense_ms:.3g} ms for the dense model; profile it "
                          f"again (`{profile}`)")
    return LatencyBudget(table, structure, dense_ms, str(path))
