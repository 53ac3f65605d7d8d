"""Latency as a budget metric (`finetune --target-latency MS`) and the widths it likes (`--align auto`), read from
the table `sslcompress profile` built.

The budget's third metric beside MACs and parameters: the predicted milliseconds of the model as the weights
are now (sslcompress/latency/predict.py: each layer's measured op latency at the widths the count keeps,
calibrated by the whole dense model), as a fraction of the dense model's. The controller, pace and the final
ranking then steer it as they steer the MAC fraction. Prediction reads the dense model's layers, so a model
thinned during sparsify is predicted by its layers' names at the widths they keep.

`--weighting latency` (the default with --target-latency) weighs each group of the group Lasso by the
milliseconds removing it saves, from the same table (channel_latency_costs, group_latency_costs), and the
final ranking sizes its chunks of forced zeroing by them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..latency.key import current_key, default_path
from ..latency.predict import fingerprint, parts_at, predict, predict_dense
from ..latency.signature import CHANNEL_BLOCK
from ..latency.step import ChannelStep, channel_step
from ..latency.table import LatencyTable, load_table
from .counting import ModelCount
from .groups import ParamGroup
from .structure import Layer, ModelStructure, analyze

# A channel's saving is raised to at least this share of the smallest positive one: ORT's cost is a staircase
# in the width, so a block less can save nothing or even be slower, yet every group must still be penalised
# (weighed below every channel that saves time, so it goes last).
FLOOR_SHARE = 0.1


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


def needs_latency(cfg) -> bool:
    """Whether a run reads the latency table: a latency target, or group weights by latency (ssl only)."""
    return cfg.target_latency is not None or (cfg.weighting == "latency" and cfg.method == "ssl")


def latency_budget(cfg, model: nn.Module, input_shape: tuple[int, ...], model_name: str) -> LatencyBudget | None:
    """The table for the options' session, read for the dense `model`; None unless --target-latency or
    --weighting latency asks for it. One sentence (ConfigError) when there is no table, it was measured
    elsewhere, or it lacks this model."""
    if not needs_latency(cfg):
        return None
    flag = "--target-latency" if cfg.target_latency is not None else "--weighting latency"
    table, path, profile = _table(cfg, model_name, flag)
    structure = analyze(model, input_shape)
    try:
        dense_ms = predict_dense(table, structure)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (`{profile}`)") from exc
    if not dense_ms > 0:
        raise ConfigError(f"the latency table at {path} predicts {dense_ms:.3g} ms for the dense model; profile it "
                          f"again (`{profile}`)")
    return LatencyBudget(table, structure, dense_ms, str(path))


def latency_step(align: Any, budget: LatencyBudget | None = None) -> int:
    """The channels a latency saving is measured over: ORT's channel block (the table's, where its key holds
    one), or the --align value when larger."""
    block = max(1, budget.table.key.block) if budget is not None else CHANNEL_BLOCK
    return max(block, align) if isinstance(align, int) and not isinstance(align, bool) else block


def _factors(budget: LatencyBudget) -> tuple[float, float]:
    """The calibration's (blocked, plain) factors of the dense model (predict.py); 1, 1 where the table has no
    whole-model timing of it. Its constant does not move with the widths, so a saving leaves it out."""
    timing = budget.table.models.get(fingerprint(budget.structure))
    if timing is None:
        return 1.0, 1.0
    _, blocked, plain = timing.calibration()
    return blocked, plain


def _full_widths(lay: Layer) -> tuple[int, int]:
    """The layer's (input, output) widths as its weight holds them (a thinned layer's are its kept ones)."""
    w = lay.weight_shape
    return (w[1] * lay.groups if lay.kind == "conv" else w[1]), w[0]


class _Timer:
    """Calibrated ms of every call of a layer at given widths, as predict counts them: the dense model's layer
    of that name gives the table entries (a thinned model's layers keep their names, not their signatures)."""

    def __init__(self, budget: LatencyBudget):
        self.budget, self.factors = budget, _factors(budget)

    def __call__(self, name: str, cin: int, cout: int) -> float:
        dense = self.budget.structure.layers.get(name)
        if dense is None:
            raise ConfigError(f"layer {name} is not in the model the latency table was read for")
        blocked, plain = parts_at(self.budget.table, dense, (cin, cout))
        return self.factors[0] * blocked + self.factors[1] * plain


def _per_channel(timer: _Timer, name: str, full: float, widths: tuple[int, int], cut: tuple[int, int],
                 k: int, width: int) -> float:
    """ms saved per channel when the layer's (input, output) widths lose `cut`, k channels of an axis `width`
    wide; with no channel to spare (a width of 1) the layer goes: its whole time over that width."""
    if k <= 0:
        return full / max(1, width)
    return (full - timer(name, widths[0] - cut[0], widths[1] - cut[1])) / k


def channel_latency_costs(budget: LatencyBudget, step: int, structure: ModelStructure | None = None
                          ) -> dict[int, float]:
    """Per root channel of `structure` (the dense model's by default; a thinned model's by its layers' names),
    the predicted ms that removing the channel saves: for each layer that writes it, the layer's calibrated
    table time at its widths minus that with `step` fewer outputs, over `step`; for each layer that reads it
    (a depthwise conv carries its channel, counted once), the same along the input width. A difference over a
    block rather than one channel, because ORT's time is a staircase in the width (one channel less can even
    be slower). Savings below FLOOR_SHARE of the smallest positive one are raised to it."""
    st = structure if structure is not None else budget.structure
    timer = _Timer(budget)
    saving: dict[int, float] = {}
    for name, lay in st.layers.items():
        cin, cout = _full_widths(lay)
        full = timer(name, cin, cout)
        if lay.carries_channels:
            # A depthwise conv's inputs and outputs go together: k inputs take k x multiplier outputs.
            mult = max(1, cout // max(1, cin))
            k = min(step, cin - 1)
            per_out = _per_channel(timer, name, full, (cin, cout), (k, k * mult), k, cin) / mult
            sides = [(lay.out_ids, per_out)]
        else:
            k_out, k_in = min(step, cout - 1), min(step, cin - 1)
            sides = [(lay.out_ids, _per_channel(timer, name, full, (cin, cout), (0, k_out), k_out, cout)),
                     (lay.in_ids, _per_channel(timer, name, full, (cin, cout), (k_in, 0), k_in, cin))]
        for ids, per_id in sides:
            # A Linear after a flatten reads each channel through several features, each an id of it.
            for i in ids:
                r = st.root(i)
                saving[r] = saving.get(r, 0.0) + per_id
    positive = [v for v in saving.values() if v > 0]
    floor = FLOOR_SHARE * (min(positive) if positive else budget.dense_ms / max(1, len(saving)))
    return {r: max(v, floor) for r, v in saving.items()}


def group_latency_costs(budget: LatencyBudget, groups: list[ParamGroup], step: int,
                        structure: ModelStructure | None = None) -> list[float]:
    """Per group (aligned with `groups`), the predicted ms removing it saves: its channel's saving
    (channel_latency_costs) for a group that deletes a channel, else its MACs at its layers' ms per MAC (their
    calibrated table time at the widths they have over their MACs; the dense model's ms per MAC for a group of
    no layer), so every group has a latency cost."""
    st = structure if structure is not None else budget.structure
    channel = channel_latency_costs(budget, step, st)
    timer = _Timer(budget)
    layer_ms: dict[str, float] = {}
    fallback = budget.dense_ms / max(1, budget.structure.dense_macs)
    out = []
    for g in groups:
        if g.channel is not None and g.channel in channel:
            out.append(channel[g.channel])
            continue
        names = [n for n in g.layers if n in st.layers]
        for n in names:
            if n not in layer_ms:
                layer_ms[n] = timer(n, *_full_widths(st.layers[n]))
        macs = sum(st.layers[n].macs for n in names)
        ms = sum(layer_ms[n] for n in names)
        out.append(max(float(g.cost), 1.0) * (ms / macs if macs > 0 and ms > 0 else fallback))
    return out
