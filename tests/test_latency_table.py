"""The latency table (sslcompress.latency) and `sslcompress profile`: key and cache path, JSON, grids,
measuring only what a table lacks, prediction by interpolation, and the CLI. No timing values are asserted
beyond being finite and positive: the machine is shared."""

from __future__ import annotations

import dataclasses
import json
import math
from itertools import product

import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from sslcompress.cli import main
from sslcompress.errors import ConfigError
from sslcompress.finetune.counting import Counter
from sslcompress.finetune.structure import analyze
from sslcompress.latency import (
    LatencyTable,
    Signature,
    current_key,
    default_path,
    default_step,
    load_table,
    predict,
    predict_dense,
    profile_model,
    save_table,
    signatures_of,
    width_grid,
)
from sslcompress.latency.predict import (
    entry_latency,
    fingerprint,
    layer_latency,
    layers_latency,
    layers_parts,
)
from sslcompress.latency.profile import PASSES, half_variant, missing_points, off_block_variant
from sslcompress.latency.signature import below_block, input_kind
from sslcompress.latency.table import ModelTiming, WholeRun
from sslcompress.models import ModelSpec, build_model

LENET = (1, 1, 28, 28)
RESNET = (1, 3, 32, 32)
COARSE = 250  # lenet's grid: full widths and a few points on the wide Linear layers


def _lenet() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec("lenet5", 10, 1, (28, 28))).eval()


def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec("resnet20", 10, 3, (32, 32))).eval()


@pytest.fixture(scope="module")
def lenet_table():
    """lenet5 profiled once, coarsely, with every measurement recorded."""
    model, events = _lenet(), []
    table = profile_model(model, LENET, current_key(), step=COARSE, on_progress=events.append, rounds=1)
    return model, table, events


def _key8():
    """This machine's key, for a CPU with ORT's channel blocks of 8 (AVX2): the grids below depend on it."""
    return dataclasses.replace(current_key(), block=8)


def _synthetic(structure, step: int) -> LatencyTable:
    """A table on the grid profile would measure, filled with f(in, out) = 0.01 + 0.001 in out per call:
    bilinear interpolation reproduces such an f exactly at any width."""
    table = LatencyTable(_key8())
    for sig, points in missing_points(table, structure, step).items():
        table.entry(sig).points = {(i, o): _f(i, o) for i, o in points}
    return table


def _f(i: float, o: float) -> float:
    return 0.01 + 0.001 * i * o


# ---------------------------------------------------------------- key, path, JSON
def test_key_slug_and_default_path(monkeypatch, tmp_path):
    monkeypatch.setenv("SSLCOMPRESS_CACHE_DIR", str(tmp_path))
    key = current_key("cpu", threads=2, batch=8)
    assert key.cpus >= 1 and key.ort_version == ort.__version__ and key.machine
    path = default_path(key)
    assert path.parent == tmp_path / "latency"
    assert path.name == f"{key.slug()}-{key.digest()}.json"
    assert "-cpu-t2-b8-ort" in key.slug() and " " not in path.name
    assert default_path(key, tmp_path / "elsewhere").parent == tmp_path / "elsewhere"


def test_a_different_key_gives_another_file(tmp_path):
    one, eight = current_key(batch=1), current_key(batch=8)
    assert default_path(one, tmp_path) != default_path(eight, tmp_path)
    assert current_key(threads=2).digest() != one.digest()
    save_table(LatencyTable(one), default_path(one, tmp_path))
    with pytest.raises(ConfigError, match="batch 8"):
        load_table(default_path(one, tmp_path), eight)


def test_bad_key_settings_are_refused():
    with pytest.raises(ConfigError, match="tpu"):
        current_key("tpu")
    with pytest.raises(ConfigError, match="threads"):
        current_key(threads=0)


def test_json_round_trip(lenet_table, tmp_path):
    _, table, _ = lenet_table
    path = tmp_path / "sub" / "table.json"
    save_table(table, path)
    back = load_table(path, table.key)
    assert back.to_dict() == table.to_dict()
    assert back.entries.keys() == table.entries.keys()
    assert {fp: m.total_ms for fp, m in back.models.items()} == {fp: m.total_ms for fp, m in table.models.items()}
    assert json.loads(path.read_text())["format"] == "sslcompress-latency-table"


def test_a_file_that_is_not_a_table_is_refused(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not a latency table"):
        load_table(path)


def _stale_table(path, version: int = 2):
    """An empty table of this machine's key as an older format version wrote it: what an older sslcompress left."""
    save_table(LatencyTable(current_key()), path)
    raw = json.loads(path.read_text())
    raw["version"] = version
    path.write_text(json.dumps(raw))
    return path


# 3: a table without the layout reorders around its ops, which every prediction now adds
@pytest.mark.parametrize("version", [2, 3])
def test_a_table_of_another_version_is_profiled_afresh_not_refused(tmp_path, version):
    # A cache an older sslcompress wrote: reading it for a prediction says to profile again, and profiling
    # starts a new table in its place (it used to refuse the very command its message named).
    from sslcompress.latency.profile import load_or_new
    from sslcompress.latency.table import StaleTableError

    path = _stale_table(tmp_path / "t.json", version)
    with pytest.raises(StaleTableError, match=f"version {version}.*profile the model again"):
        load_table(path, current_key())
    heard = []
    table = load_or_new(path, current_key(), on_stale=heard.append)
    assert table.key == current_key() and not table.entries
    assert len(heard) == 1 and "measuring afresh" in heard[0] and str(path) in heard[0]
    # Another key is still refused: that table is not stale, it is someone else's.
    save_table(LatencyTable(current_key(batch=8)), path)
    with pytest.raises(ConfigError, match="batch 8"):
        load_or_new(path, current_key(), on_stale=heard.append)


# ---------------------------------------------------------------- grids
def test_width_grid_is_the_multiples_of_step_and_the_full_width():
    assert width_grid(64, 16) == [16, 32, 48, 64]
    assert width_grid(50, 16) == [16, 32, 48, 50]
    assert width_grid(5, 8) == [5]
    assert width_grid(12, 5, multiple=4) == [8, 12]  # a grouped conv's widths stay multiples of its groups
    assert default_step(512) == 32 and default_step(64) == 8 and default_step(16) == 8 and default_step(10) == 1
    assert width_grid(100) == [8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 100]


def test_profile_grid_holds_step_multiples_and_pins_fixed_widths():
    structure = analyze(_resnet20(), RESNET)
    plan = missing_points(LatencyTable(_key8()), structure, 8)
    by_layer = {name: signatures_of(lay)[0] for name, lay in structure.layers.items()}
    stage1 = plan[by_layer["layer1.0.conv1"]]
    # input widths: the grid and one below each multiple of the block (8 here) where ORT leaves its blocked
    # convs, and the narrowest such width (9); and 7, the widest of the fewer channels than a block that ORT
    # reads in place, a kind of its own (signature.input_kind)
    assert sorted({i for i, _ in stage1}) == [7, 8, 9, 15, 16] and sorted({o for _, o in stage1}) == [8, 16]
    assert len(stage1) == 10
    assert {i for i, _ in plan[by_layer["conv1"]]} == {3}  # the model's input channels never change
    assert {o for _, o in plan[by_layer["fc"]]} == {10}  # nor do its outputs
    assert {i for i, _ in plan[by_layer["fc"]]} == set(range(8, 65, 8))


def test_depthwise_conv_has_one_width_axis():
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1, groups=32),
                          nn.ReLU(), nn.Conv2d(64, 8, 1)).eval()
    structure = analyze(model, (1, 3, 16, 16))
    (sig,) = signatures_of(structure.layers["2"])
    assert sig.depthwise and sig.multiplier == 2
    points = missing_points(LatencyTable(_key8()), structure, 8)[sig]
    widths = (8, 9, 15, 16, 23, 24, 31, 32)
    assert points == [(w, 2 * w) for w in widths]
    table = profile_model(model, (1, 3, 16, 16), _key8(), step=8, rounds=1)
    entry = table.entries[sig.ident()]
    assert entry.ins() == list(widths) and len(entry.points) == len(widths)
    # between grid points the one axis interpolates linearly, among widths of the same kind (ORT blocks a
    # depthwise conv whose channels fill blocks: 19 x 2 does not)
    assert entry_latency(entry, 19, 38, 8) == pytest.approx((entry.points[(15, 30)] + entry.points[(23, 46)]) / 2)
    assert entry_latency(entry, 20, 40, 8) == pytest.approx((entry.points[(16, 32)] + entry.points[(24, 48)]) / 2)
    assert entry_latency(entry, 16, 32, 8) == entry.points[(16, 32)]


# ---------------------------------------------------------------- measuring only what is missing
def test_profile_measures_finite_positive_latencies(lenet_table):
    model, table, events = lenet_table
    assert events and events[-1].done == events[-1].total == len(events)
    assert all(math.isfinite(ms) and ms > 0 for e in table.entries.values() for ms in e.points.values())
    (timing,) = table.models.values()
    assert [r.label for r in timing.runs] == ["dense", "off-block", "half", "random-1", "random-aligned-2",
                                              "random-3", "random-aligned-4"]
    assert all(r.total_ms > 0 and r.layers_ms > 0 for r in timing.runs)
    assert events[-1].stage == "model"
    # The dense prediction is the calibration applied to the dense layers' table sums, as profile stored them
    # (it equals the measured total where the three-term fit holds exactly; the fallbacks fit the runs by least
    # squares, so there only approximately, as timing noise decides), and the layout reorders its widths need
    # (LeNet's blocked last conv is reordered for the flatten before its Linear) as measured.
    constant, blocked, plain = timing.calibration()
    dense = timing.runs[0]
    assert dense.reorder_ms > 0
    assert predict_dense(table, analyze(model, LENET)) == pytest.approx(
        constant + blocked * dense.blocked_ms + plain * dense.plain_ms + dense.reorder_ms)


def test_a_second_profile_measures_nothing(lenet_table):
    model, table, events = lenet_table
    before = table.to_dict()
    again = []
    profile_model(model, LENET, current_key(), table, step=COARSE, on_progress=again.append, rounds=1)
    assert len(events) > 0 and again == []
    assert table.to_dict() == before


def test_a_finer_step_measures_only_new_points_and_keeps_the_grid_rectangular(lenet_table):
    model, table, _ = lenet_table
    table = LatencyTable.from_dict(table.to_dict())  # a copy: the fixture's table stays as it was
    before = {k: dict(e.points) for k, e in table.entries.items()}
    added = []
    profile_model(model, LENET, current_key(), table, step=200, on_progress=added.append, rounds=1)
    assert added and all(e.stage == "layers" for e in added)  # the whole model was timed before
    for ident, entry in table.entries.items():
        assert before[ident].items() <= entry.points.items()
        assert len(entry.points) == len(entry.ins()) * len(entry.outs())
    # each new point read once per pass over the grid (profile.PASSES on the CPU), the progress with each
    new_points = sum(len(e.points) for e in table.entries.values()) - sum(map(len, before.values()))
    assert len(added) == PASSES * new_points and added[-1].done == added[-1].total


def test_a_table_of_another_key_is_refused(lenet_table):
    model, table, _ = lenet_table
    with pytest.raises(ConfigError, match="another machine"):
        profile_model(model, LENET, current_key(batch=4), table)


# ---------------------------------------------------------------- prediction
def _zero_filters(model: nn.Module, name: str, keep: int) -> None:
    """Zero all but the first `keep` filters of a conv, with their BatchNorm scale and shift."""
    conv, bn = model.get_submodule(name), model.get_submodule(name.replace("conv", "bn"))
    with torch.no_grad():
        for p in (conv.weight, bn.weight, bn.bias):
            p[keep:] = 0


def test_prediction_is_the_table_value_at_grid_widths():
    model = _resnet20()
    structure = analyze(model, RESNET)
    table = _synthetic(structure, 8)
    _zero_filters(model, "layer1.0.conv1", 8)  # 8 of 16: a grid width
    count = Counter(model, RESNET, structure).count()
    lay = structure.layers["layer1.0.conv1"]
    assert count.layer("layer1.0.conv1").filters == (8, 16)
    assert layer_latency(table, lay, count.layer("layer1.0.conv1")) == pytest.approx(_f(16, 8))
    assert layer_latency(table, structure.layers["layer1.0.conv2"], count.layer("layer1.0.conv2")) \
        == pytest.approx(_f(8, 16))
    dense = layers_latency(table, structure)
    assert predict(table, structure, count) == pytest.approx(dense - _f(16, 16) * 2 + _f(16, 8) + _f(8, 16))


def test_prediction_interpolates_between_grid_widths():
    model = _resnet20()
    structure = analyze(model, RESNET)
    table = _synthetic(structure, 16)  # stage-2 grid 16, 32; stage 3: 16 .. 64
    _zero_filters(model, "layer2.0.conv1", 21)
    _zero_filters(model, "layer3.1.conv1", 37)
    count = Counter(model, RESNET, structure).count()
    # a blocked conv (16 inputs) computes its outputs in whole blocks: 21 costs what 24 does
    assert layer_latency(table, structure.layers["layer2.0.conv1"], count.layer("layer2.0.conv1")) \
        == pytest.approx(_f(16, 24))
    assert layer_latency(table, structure.layers["layer3.1.conv2"], count.layer("layer3.1.conv2")) \
        == pytest.approx(_f(37, 64))
    # and really between two measured points, not at one of them
    entry = table.entries[signatures_of(structure.layers["layer3.1.conv1"])[0].ident()]
    assert entry.outs() == [16, 32, 48, 64]
    lo, hi = entry.points[(64, 32)], entry.points[(64, 48)]
    assert lo < entry_latency(entry, 64, 37) < hi


def test_input_widths_off_the_channel_blocks_interpolate_among_their_kind():
    """ORT's blocked convs take input widths in multiples of the block (8 here) or narrower than one; the others
    run slower, and are measured and interpolated apart (here: on-block ops cost 1 ms, off-block ones 2 ms)."""
    structure = analyze(_resnet20(), RESNET)
    table = LatencyTable(_key8())
    for sig, points in missing_points(table, structure, 8).items():
        table.entry(sig).points = {(i, o): 1.0 if i % 8 == 0 or i < 8 else 2.0 for i, o in points}
    entry = table.entries[signatures_of(structure.layers["layer3.1.conv1"])[0].ident()]
    assert entry.ins() == [7, 8, 9, 15, 16, 23, 24, 31, 32, 39, 40, 47, 48, 55, 56, 63, 64]
    assert entry_latency(entry, 45, 64, 8) == 2.0 and entry_latency(entry, 46, 37, 8) == 2.0
    assert entry_latency(entry, 40, 64, 8) == 1.0 and entry_latency(entry, 48, 37, 8) == 1.0
    assert entry_latency(entry, 3, 64, 8) == 1.0  # fewer than a block: read in place, blocked


def test_widths_below_one_block_read_on_their_own_line_not_toward_the_block():
    """ORT reads fewer input channels than a block in place, at a higher cost per channel than its blocked
    kernel (AVX-512, block 16, 32x32 at batch 8: 8 channels 0.24 ms, 12 0.39, 15 0.45, 16 0.39). The grid
    holds 15 beside its multiples of 8, and 12 reads between 8 and 15, not half way from 8 to 16."""
    structure = analyze(_resnet20(), RESNET)
    table = LatencyTable(dataclasses.replace(current_key(), block=16))
    for sig, points in missing_points(table, structure, 8).items():
        table.entry(sig).points = {(i, o): 0.03 * i if i < 16 else 0.39 for i, o in points}
    entry = table.entries[signatures_of(structure.layers["layer1.0.conv1"])[0].ident()]
    assert entry.ins() == [8, 15, 16]
    assert entry_latency(entry, 12, 16, 16) == pytest.approx(0.36)
    assert entry_latency(entry, 16, 16, 16) == 0.39 and entry_latency(entry, 8, 8, 16) == pytest.approx(0.24)
    assert input_kind(12, 16) == "narrow" and input_kind(16, 16) == "blocked" and input_kind(12, 16, 8) == "narrow"
    assert input_kind(17, 16, 16) == "plain" and input_kind(20, 16, 4) == "blocked" and input_kind(3, 1) == "blocked"
    assert below_block([8, 16], 16) == [15] and below_block([8], 16) == [] and below_block([8, 15, 16], 16) == []


def test_narrow_plain_widths_read_between_one_above_a_block_and_two_blocks_less_one():
    """A plain conv is not padded: 11 input channels cost less than 15, read between 9 and 15 (before the
    narrowest plain width was measured, 11 read as 15)."""
    structure = analyze(_resnet20(), RESNET)
    table = LatencyTable(_key8())
    for sig, points in missing_points(table, structure, 8).items():
        table.entry(sig).points = {(i, o): float(i) for i, o in points}
    entry = table.entries[signatures_of(structure.layers["layer3.1.conv1"])[0].ident()]
    assert entry_latency(entry, 11, 64, 8) == pytest.approx(11.0)
    assert entry_latency(entry, 9, 64, 8) == 9.0 and entry_latency(entry, 8, 64, 8) == 8.0


def test_widths_below_the_grid_cost_the_smallest_measured_width():
    model = _resnet20()
    structure = analyze(model, RESNET)
    table = _synthetic(structure, 8)
    _zero_filters(model, "layer1.0.conv1", 3)
    count = Counter(model, RESNET, structure).count()
    assert layer_latency(table, structure.layers["layer1.0.conv1"], count.layer("layer1.0.conv1")) \
        == pytest.approx(_f(16, 8))


def test_removed_layers_cost_nothing():
    model = _resnet20()
    structure = analyze(model, RESNET)
    table = _synthetic(structure, 8)
    with torch.no_grad():
        for name in ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.0.bn2"):
            for p in model.get_submodule(name).parameters():
                p.zero_()
    count = Counter(model, RESNET, structure).count()
    assert "layer1.0" in count.blocks_removed
    for name in ("layer1.0.conv1", "layer1.0.conv2"):
        assert count.layer(name).removed
        assert layer_latency(table, structure.layers[name], count.layer(name)) == 0.0
    assert predict(table, structure, count) == pytest.approx(layers_latency(table, structure) - 2 * _f(16, 16))


def test_calibration_scales_the_overhead_with_the_layers():
    model = _resnet20()
    structure = analyze(model, RESNET)
    table = _synthetic(structure, 8)
    dense = layers_latency(table, structure)
    table.models[fingerprint(structure)] = ModelTiming(
        "resnet20", [WholeRun("dense", dense + 1.0, *layers_parts(table, structure))])
    assert predict_dense(table, structure) == pytest.approx(dense + 1.0)
    _zero_filters(model, "layer1.0.conv1", 8)
    count = Counter(model, RESNET, structure).count()
    layers = layers_latency(table, structure, count)
    assert predict(table, structure, count) == pytest.approx(layers + 1.0 * layers / dense)


def _runs(table, model, structure, constant, a_blocked, a_plain) -> list[WholeRun]:
    """The dense model and its two variants as profile records them, with totals made of known factors."""
    runs = []
    for label, variant in (("dense", None), ("off-block", off_block_variant(model, RESNET, structure)),
                           ("half", half_variant(model, RESNET, structure))):
        count = Counter(variant, RESNET, structure).count() if variant is not None else None
        b, p = layers_parts(table, structure, count)
        runs.append(WholeRun(label, constant + a_blocked * b + a_plain * p, b, p))
    return runs


def test_three_whole_models_give_a_fixed_cost_and_a_factor_per_kind_of_op():
    """The dense model (mostly blocked convs), its off-block variant (plain ones) and its half variant (small
    blocked ones) timed whole: T = c + a_blocked B + a_plain P three times, solved; a prediction weighs each
    kind by its own factor and adds the fixed cost."""
    model = _resnet20()
    structure = analyze(model, RESNET)
    table = _synthetic(structure, 8)
    runs = _runs(table, model, structure, 0.2, 0.6, 0.9)
    dense, off, half = runs
    assert off.plain_ms > dense.plain_ms and off.blocked_ms < dense.blocked_ms and half.blocked_ms < dense.blocked_ms
    table.models[fingerprint(structure)] = ModelTiming("resnet20", runs)
    assert table.models[fingerprint(structure)].calibration() == pytest.approx((0.2, 0.6, 0.9))
    assert predict_dense(table, structure) == pytest.approx(dense.total_ms)
    _zero_filters(model, "layer3.1.conv1", 45)
    count = Counter(model, RESNET, structure).count()
    b, p = layers_parts(table, structure, count)
    assert predict(table, structure, count) == pytest.approx(0.2 + 0.6 * b + 0.9 * p)
    # two runs: the factors alone
    table.models[fingerprint(structure)] = ModelTiming("resnet20", _runs(table, model, structure, 0.0, 0.6, 0.9)[:2])
    assert table.models[fingerprint(structure)].calibration() == pytest.approx((0.0, 0.6, 0.9))


def test_calibrations_that_are_ill_posed_or_unphysical_fall_back():
    one = [WholeRun("dense", 2.0, 1.0, 3.0)]
    assert ModelTiming("m", one).calibration() == pytest.approx((0.0, 0.5, 0.5))
    same_mix = [*one, WholeRun("off-block", 4.0, 2.0, 6.0)]
    assert ModelTiming("m", same_mix).calibration() == pytest.approx((0.0, 0.5, 0.5))
    # no blocked ops at all: one factor, fitted to both runs (their ratios 0.5 and 0.6, relative least squares)
    no_blocked = [WholeRun("dense", 2.0, 0.0, 4.0), WholeRun("off-block", 3.0, 0.0, 5.0)]
    assert ModelTiming("m", no_blocked).calibration() == pytest.approx((0.0, 33 / 61, 33 / 61))
    # three runs whose exact solution costs -1 ms fixed: kept (the ops' own overhead alone), every run positive
    negative = [WholeRun("dense", 4.0, 4.0, 1.0), WholeRun("off-block", 4.0, 1.0, 4.0), WholeRun("half", 1.5, 2.0, 0.5)]
    assert ModelTiming("m", negative).calibration() == pytest.approx((-1.0, 1.0, 1.0))
    # a negative constant whose prediction of a model far narrower than its runs would fall below nothing:
    # the floor, a tenth of the scaled ops
    structure = analyze(_resnet20(), RESNET)
    table = _synthetic(structure, 8)
    db, dp = layers_parts(table, structure)
    c = -0.45 * (db + dp)
    table.models[fingerprint(structure)] = ModelTiming("resnet20", [
        WholeRun("dense", c + db + dp, db, dp),
        WholeRun("off-block", c + db + dp + 1e-3, db / 2, dp + db / 2 + 1e-3),
        WholeRun("half", c + (db + dp) / 2, db / 2, dp / 2)])
    assert table.models[fingerprint(structure)].calibration()[0] == pytest.approx(c)
    model = _resnet20()
    for stage, block in product((1, 2, 3), (0, 1, 2)):
        _zero_filters(model, f"layer{stage}.{block}.conv1", 1)
    count = Counter(model, RESNET, structure).count()
    b, p = layers_parts(table, structure, count)
    assert c + b + p < 0 and predict(table, structure, count) == pytest.approx(0.1 * (b + p))
    # three runs that fit two factors without a constant: found exactly
    exact = [WholeRun(r.label, 0.7 * r.blocked_ms + 0.9 * r.plain_ms, r.blocked_ms, r.plain_ms) for r in negative]
    assert ModelTiming("m", exact).calibration() == pytest.approx((0.0, 0.7, 0.9), abs=1e-9)


def test_variants_narrow_every_free_width():
    model = _resnet20()
    structure = analyze(model, RESNET)
    off = Counter(off_block_variant(model, RESNET, structure), RESNET, structure).count()
    assert off.layer("conv1").channels == (3, 3) and off.layer("conv1").filters == (15, 16)
    assert off.layer("layer1.0.conv1").filters == (15, 16)
    assert off.layer("layer3.0.conv1").channels == (31, 32) and off.layer("layer3.0.conv1").filters == (63, 64)
    assert off.layer("fc").channels == (63, 64) and off.layer("fc").filters == (10, 10)
    half = Counter(half_variant(model, RESNET, structure), RESNET, structure).count()
    assert half.layer("layer1.0.conv2").filters == (8, 16) and half.layer("layer2.0.conv1").filters == (16, 32)
    assert half.layer("layer3.2.conv1").channels == (32, 64) and half.layer("fc").filters == (10, 10)
    assert next(model.parameters()).count_nonzero() == next(model.parameters()).numel()  # the model is untouched


def test_a_layer_the_table_lacks_is_named():
    structure = analyze(_resnet20(), RESNET)
    with pytest.raises(ConfigError, match="conv1"):
        predict(LatencyTable(current_key()), structure)


def test_signature_round_trip():
    sig = Signature("conv", 64, 32, (3, 3), (2, 2), (1, 1), (1, 1), 1, (16, 16))
    assert Signature.from_dict(json.loads(json.dumps(sig.to_dict()))) == sig
    assert "s2x2" in sig.ident() and "hw16x16" in sig.ident()


# ---------------------------------------------------------------- CLI
def test_cli_writes_the_table_and_prints_it(tmp_path):
    path = tmp_path / "lenet.json"
    args = ["profile", "--model", "lenet5", "--step", str(COARSE), "--rounds", "1", "--table", str(path), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert path.is_file() and load_table(path, current_key()).entries
    assert "fc1" in res.output and f"table: {path}" in res.output and "dense:" in res.output
    assert f"channel block on this CPU: {current_key().block}" in res.output and "calibration by 7 whole models" in res.output
    again = CliRunner().invoke(main, [*args, "--json"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.output)
    assert summary["measured"] == 0 and summary["dense_ms"] > 0 and summary["table"] == str(path)
    assert summary["key"]["block"] == current_key().block and summary["calibration"]["blocked_factor"] > 0
    assert [r["layer"] for r in summary["layers"]] == ["conv1", "conv2", "fc1", "fc2"]


def test_cli_default_table_goes_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLCOMPRESS_CACHE_DIR", str(tmp_path))
    res = CliRunner().invoke(main, ["profile", "--model", "lenet5", "--step", str(COARSE), "--rounds", "1",
                                    "--batch", "2", "-q"])
    assert res.exit_code == 0, res.output
    (path,) = (tmp_path / "latency").glob("*.json")
    assert path == default_path(current_key(batch=2))


def test_cli_profiles_over_a_table_of_another_version(tmp_path):
    path = _stale_table(tmp_path / "lenet.json")
    res = CliRunner().invoke(main, ["profile", "--model", "lenet5", "--step", str(COARSE), "--rounds", "1",
                                    "--table", str(path), "-q"])
    assert res.exit_code == 0, res.output
    assert "note:" in res.output and "measuring afresh" in res.output
    assert load_table(path, current_key()).entries


def test_cli_table_of_another_key_is_one_line(tmp_path):
    path = tmp_path / "t.json"
    save_table(LatencyTable(current_key(batch=8)), path)
    res = CliRunner().invoke(main, ["profile", "--model", "lenet5", "--table", str(path), "-q"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "batch 8" in lines[0]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime-gpu is here")
def test_cli_cuda_without_onnxruntime_gpu_is_one_line():
    res = CliRunner().invoke(main, ["profile", "--model", "lenet5", "--provider", "cuda"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output
    assert lines[0].startswith("error:") and "onnxruntime-gpu" in lines[0]


def test_cli_bad_input_shape_is_one_line():
    res = CliRunner().invoke(main, ["profile", "--model", "lenet5", "--input-shape", "1,28"])
    assert res.exit_code == 2 and "C,H,W" in res.output


def test_the_calibration_takes_the_form_that_predicts_left_out_runs_best():
    from sslcompress.latency.table import _fit

    # 0.8 ms per table ms, timed with a few percent of noise: the constant's extra freedom fits the noise and
    # predicts a left-out run worse than the two factors alone (leave-one-out 2.9% against 1.8%)
    noise = (1.00, 1.04, 0.97, 1.03, 0.96, 1.02)
    parts = ((9.0, 1.0), (1.0, 11.0), (4.5, 0.5), (3.0, 4.0), (5.0, 1.0), (2.0, 6.0))
    runs = [WholeRun(f"r{i}", 0.8 * (b + p) * n, b, p) for i, ((b, p), n) in enumerate(zip(parts, noise))]
    with_constant = _fit(lambda b, p: (1.0, b, p), [(r.total_ms, r.blocked_ms, r.plain_ms) for r in runs])
    assert with_constant is not None and abs(with_constant[0]) > 0.05
    constant, a_blocked, a_plain = ModelTiming("m", runs).calibration()
    assert constant == 0.0 and a_blocked == pytest.approx(0.775, abs=1e-3) and a_plain == pytest.approx(0.838, abs=1e-3)
