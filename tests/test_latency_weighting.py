"""`--weighting latency`: each group of the group Lasso weighs what removing it saves in predicted ms (the
latency table's finite difference over a block of channels), and the final ranking sizes its chunks of forced
zeroing by the same savings. The tables here are filled by hand, so the costs are known exactly."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from finetune_cli import short_finetune
from torch import nn

from sslcompress.config import FinetuneConfig, build_config
from sslcompress.errors import ConfigError
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.latency_budget import (
    FLOOR_SHARE,
    LatencyBudget,
    channel_latency_costs,
    group_latency_costs,
)
from sslcompress.finetune.regularizer import GroupLasso
from sslcompress.finetune.sparsifier import Sparsifier
from sslcompress.finetune.structure import analyze
from sslcompress.latency import current_key
from sslcompress.latency.predict import fingerprint, predict_dense
from sslcompress.latency.profile import missing_points
from sslcompress.latency.signature import signatures_of
from sslcompress.latency.table import LatencyTable, ModelTiming, WholeRun, save_table
from sslcompress.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")
A, B = 2e-3, 1e-3
SHAPE = (1, 3, 8, 8)


def _model(width: int = 16) -> nn.Module:
    """conv "0" (3 -> width) and conv "2" (width -> 24): the names stay when the width is thinned."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 24, 3, padding=1))


def _budget(structure, costs: dict, every_out: bool = False, timed: float | None = None) -> LatencyBudget:
    """A table with `costs[layer](in, out)` ms at every input width and at the outputs 1 and full (every output
    width with `every_out`): exact wherever the cost is bilinear. `timed`: the whole model measured at that
    multiple of its layers' sum (one run: one calibration factor for every op). Keyed for a CPU without channel
    blocks, so the figures are read as filled (no output width padded to a block)."""
    table = LatencyTable(dataclasses.replace(current_key(), block=1))
    for name, lay in structure.layers.items():
        for sig in signatures_of(lay):
            outs = range(1, sig.out_full + 1) if every_out else (1, sig.out_full)
            table.entry(sig).points = {(i, o): costs[name](i, o) for i in range(1, sig.in_full + 1) for o in outs}
    if timed is not None:
        layers = predict_dense(table, structure)
        table.models[fingerprint(structure)] = ModelTiming("m", [WholeRun("dense", timed * layers, layers, 0.0)])
    return LatencyBudget(table, structure, predict_dense(table, structure), "hand")


def _roots(structure, layer: str, side: str = "out_ids") -> set[int]:
    return {structure.root(i) for i in getattr(structure.layers[layer], side)}


LINEAR = {"0": lambda i, o: A * i * o, "2": lambda i, o: B * i * o}


@pytest.mark.parametrize("timed", [None, 1.5])
def test_a_linear_cost_gives_its_slope(timed):
    st = analyze(_model(), SHAPE)
    costs = channel_latency_costs(_budget(st, LINEAR, timed=timed), 8)
    factor = timed or 1.0
    # conv 0 writes the hidden channels (A x 3 per output) and conv 2 reads them (B x 24 per input).
    for r in _roots(st, "0"):
        assert costs[r] == pytest.approx(factor * (3 * A + 24 * B))
    for r in _roots(st, "2"):
        assert costs[r] == pytest.approx(factor * 16 * B)
    for r in _roots(st, "0", "in_ids"):
        assert costs[r] == pytest.approx(factor * 16 * A)


def test_a_staircase_gives_the_block_average_and_a_loss_is_floored():
    st = analyze(_model(), SHAPE)
    stairs = {**LINEAR, "2": lambda i, o: B * i * 8 * math.ceil(o / 8)}
    budget = _budget(st, stairs, every_out=True)
    out = _roots(st, "2")
    # One channel less saves nothing on a staircase of 8; a block of 8 (or 16, an --align) saves a step's average.
    for step in (8, 16):
        costs = channel_latency_costs(budget, step)
        assert all(costs[r] == pytest.approx(16 * B) for r in out)
    # Off-block outputs slower: one channel less costs more time; the saving is floored, still positive.
    slower = {**LINEAR, "2": lambda i, o: B * i * o * (1.5 if o % 8 else 1.0)}
    costs = channel_latency_costs(_budget(st, slower, every_out=True), 1)
    assert (16 * 23 * 1.5 - 16 * 24) * B > 0  # the loss of that one channel
    positive = [3 * A + 24 * B] * 16 + [16 * A] * 3  # the hidden channels and the inputs, one channel less
    floor = FLOOR_SHARE * min(positive)
    assert all(costs[r] == pytest.approx(floor) for r in out)
    assert all(costs[r] == pytest.approx(3 * A + 24 * B) for r in _roots(st, "0"))


def test_a_thinned_model_is_costed_at_its_own_widths_by_layer_name():
    dense = analyze(_model(16), SHAPE)
    square = {**LINEAR, "0": lambda i, o: A * i * o * o}
    budget = _budget(dense, square, every_out=True)
    thinned = analyze(_model(8), SHAPE)  # its conv 0 has no entry of its own in the table
    costs = channel_latency_costs(budget, 4, thinned)
    # conv 0 at 8 outputs: A x 3 x (64 - 16) / 4; the dense model's at 16: A x 3 x (256 - 144) / 4.
    assert all(costs[r] == pytest.approx(36 * A + 24 * B) for r in _roots(thinned, "0"))
    assert all(v == pytest.approx(84 * A + 24 * B) for r, v in channel_latency_costs(budget, 4).items()
               if r in _roots(dense, "0"))


def test_groups_without_a_channel_cost_their_macs_at_their_layers_ms_per_mac():
    model = _model()
    st = analyze(model, SHAPE)
    budget = _budget(st, LINEAR)
    groups = build_groups(model, SHAPE, ("filter", "shape"), st)
    costs = group_latency_costs(budget, groups, 8, st)
    channel = channel_latency_costs(budget, 8, st)
    per_mac = {"0": A * 3 * 16 / st.layers["0"].macs, "2": B * 16 * 24 / st.layers["2"].macs}
    for g, c in zip(groups, costs):
        if g.kind == "filter":
            assert c == pytest.approx(channel[g.channel])
        else:
            (layer,) = g.layers
            assert c == pytest.approx(g.cost * per_mac[layer]) and c > 0


def test_latency_weights_follow_the_costs_with_mean_one():
    torch.manual_seed(0)
    model = _model()
    groups = build_groups(model, SHAPE, ("filter",))
    costs = [1.0 + i for i in range(len(groups))]
    lasso = GroupLasso(model, groups, "latency", costs=costs)
    ix = lasso.kinds["filter"]
    kept = [c for g, c in zip(groups, costs) if g.removable]
    assert len(kept) == ix.n > 1
    assert ix.weight.mean().item() == pytest.approx(1.0)
    assert ix.weight.tolist() == pytest.approx([c / (sum(kept) / len(kept)) for c in kept])
    with pytest.raises(ConfigError, match="latency weighting needs"):
        GroupLasso(model, groups, "latency")
    with pytest.raises(ConfigError, match="one number per group"):
        GroupLasso(model, groups, "latency", costs=costs[:-1])


def test_the_default_weighting_is_latency_with_a_latency_target():
    assert build_config(FinetuneConfig, None, {"target_latency": 1.0}).weighting == "latency"
    assert build_config(FinetuneConfig, None, {"target_latency": 1.0, "weighting": "none"}).weighting == "none"
    assert build_config(FinetuneConfig, {"target_latency": 1.0, "weighting": "macs"}, {}).weighting == "macs"
    assert build_config(FinetuneConfig, None, {"target_flops": 0.5}).weighting == "none"


def _lenet_budget(cost):
    spec = ModelSpec("lenet5", 10, 1, (28, 28))
    torch.manual_seed(0)
    model = build_model(spec)
    st = analyze(model, spec.input_shape)
    return spec, model, _budget(st, {n: cost for n in st.layers})


def test_the_ranking_estimates_a_channel_groups_latency_saving():
    spec, model, budget = _lenet_budget(lambda i, o: 1e-3 * i * o)
    cfg = build_config(FinetuneConfig, None, {"target_latency": 1.0, "structures": "filter"})
    sp = Sparsifier(model, spec, cfg, latency=budget)
    st = sp.counter.structure
    conv1 = _roots(st, "conv1")
    items = [it for it in sp._ranked(None)
             if sp.lasso.kinds["filter"].groups[it.refs[0][1]].channel in conv1]
    assert len(items) == 18  # of 20: the floor (--min-keep 0.1) keeps the 2 strongest
    # A table without channel blocks: the step is one channel. conv1 (1 -> 20) writes the channel: 1 x 1e-3;
    # conv2 (20 -> 50) reads it: 50 x 1e-3.
    for it in items:
        assert it.est["latency"] == pytest.approx(51e-3 / budget.dense_ms)
        assert it.est["latency"] != pytest.approx(it.est["macs"])
    # The lasso weighs the same savings.
    ix = sp.lasso.kinds["filter"]
    saving = {g.channel: c for g, c in zip(sp.groups, group_latency_costs(budget, sp.groups, 8, st))}
    mean = sum(saving[g.channel] for g in ix.groups) / ix.n
    assert ix.weight.tolist() == pytest.approx([saving[g.channel] / mean for g in ix.groups], rel=1e-5)
    # Without a table the estimate stays the MAC fraction.
    plain = Sparsifier(model, spec, build_config(FinetuneConfig, None, {"structures": "filter"}))
    assert all(it.est["latency"] == it.est["macs"] for it in plain._ranked(None))
    with pytest.raises(ConfigError, match="--weighting latency needs the latency table"):
        Sparsifier(model, spec, cfg)




def test_weighting_latency_without_a_table_names_the_profile_command(tmp_path):
    _, res = short_finetune(tmp_path, "--weighting", "latency", "--latency-table", str(tmp_path / "none.json"))
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "--weighting latency" in lines[0] and "sslcompress profile" in lines[0], res.output


def test_a_latency_target_runs_latency_weighted_and_lands(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("lenet5", 10, 1, (28, 28))
    structure = analyze(build_model(spec), spec.input_shape)
    table = LatencyTable(current_key())
    for sig, points in missing_points(table, structure, 8).items():
        table.entry(sig).points = {(i, o): 1e-3 * i * o for i, o in points}
    save_table(table, tmp_path / "table.json")
    dense_ms = sum(1e-3 * lay.weight_shape[1] * lay.weight_shape[0] for lay in structure.layers.values())
    asked = 0.4 * dense_ms
    _, res = short_finetune(tmp_path, "--target-latency", f"{asked:.6f}", "--latency-table", str(tmp_path / "table.json"))
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["weighting"] == "latency"
    lat = report["latency"]
    assert lat["dense_ms"] == pytest.approx(dense_ms)
    assert asked - 0.01 * dense_ms - 1e-9 <= lat["predicted_ms"] <= asked
