"""Latency as a budget metric: `finetune --target-latency MS`, predicted from the table `sslcompress profile` built.

The budget's third metric beside MACs and parameters: the predicted milliseconds of the model as the weights
are now (sslcompress/latency/predict.py: each layer's measured op latency at the widths the count keeps,
calibrated by the whole dense model), as a fraction of the dense model's. The controller, pace and the final
ranking then steer it as they steer the MAC fraction. Prediction reads the dense model's layers, so a model
thinned during sparsify is predicted by its layers' names at the widths they keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from ..latency.key import current_key, default_path
from ..latency.predict import predict, predict_dense
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


def latency_budget(cfg, model: nn.Module, input_shape: tuple[int, ...], model_name: str) -> LatencyBudget | None:
    """The table for the options' session, read for the dense `model`; None without --target-latency. One
    sentence (ConfigError) when there is no table, it was measured elsewhere, or it lacks this model."""
    if cfg.target_latency is None:
        return None
    key = current_key(cfg.latency_provider, cfg.latency_threads, cfg.latency_batch)
    path = Path(cfg.latency_table) if cfg.latency_table else default_path(key)
    profile = (f"sslcompress profile --model {model_name} --provider {cfg.latency_provider} --threads "
               f"{cfg.latency_threads} --batch {cfg.latency_batch}" + (f" --table {path}" if cfg.latency_table else ""))
    if not path.is_file():
        raise ConfigError(f"--target-latency needs a latency table of this machine and session, and there is none "
                          f"at {path}: run `{profile}` first")
    table = load_table(path, key)
    structure = analyze(model, input_shape)
    try:
        dense_ms = predict_dense(table, structure)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (`{profile}`)") from exc
    if not dense_ms > 0:
        raise ConfigError(f"the latency table at {path} predicts {dense_ms:.3g} ms for the dense model; profile it "
                          f"again (`{profile}`)")
    return LatencyBudget(table, structure, dense_ms, str(path))
