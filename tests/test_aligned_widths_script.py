"""benchmarks/aligned_widths.py: the depth variant's widths (whole or gone) and the files its smoke run writes."""

from __future__ import annotations

import json
import math

import pytest
from benchmark_script import benchmark_script


@pytest.fixture(scope="module")
def script():
    with benchmark_script("aligned_widths") as mod:
        yield mod


@pytest.fixture(scope="module")
def resnet20(script):
    model, spec = script.dense_model("resnet20", 0)
    return model, spec, script.Widths(model, spec.input_shape)


def test_depth_keeps_every_width_whole_or_empties_a_block_width(script, resnet20):
    model, spec, w = resnet20
    dense = w.macs(set())
    kept_u, _ = script.unaligned_widths(w, math.floor(0.5 * dense))
    target = w.macs(w.dead_of(kept_u))
    kept, met = script.depth_widths(w, target)
    assert met and w.macs(w.dead_of(kept)) <= target
    emptied = [i for i, (u, k) in enumerate(zip(w.units, kept)) if k != u.total]
    assert emptied and all(kept[i] == 0 and w.units[i].emptiable for i in emptied)
    # ResNet-20: a trunk width per stage (written by several layers) and one inner width per block.
    assert sum(u.emptiable for u in w.units) == 9 and not any(w.units[i].emptiable for i in (0, 4, 8))
    # The weakest go first: no kept block width is weaker than an emptied one.
    kept_norms = [u.mean_norm for u, k in zip(w.units, kept) if u.emptiable and k]
    assert max(w.units[i].mean_norm for i in emptied) <= min(kept_norms)
    # Landing: one block fewer would not have met the target.
    last = max(emptied, key=lambda i: w.units[i].mean_norm)
    back = list(kept)
    back[last] = w.units[last].total
    assert w.macs(w.dead_of(back)) > target


def test_depth_reports_a_target_below_the_trunk_as_not_met(script, resnet20):
    _, _, w = resnet20
    kept, met = script.depth_widths(w, 1)
    assert not met
    assert all((k == 0) == u.emptiable for u, k in zip(w.units, kept))


def test_the_smoke_run_cuts_and_times_the_depth_variant(script, tmp_path, monkeypatch):
    monkeypatch.setattr(script, "OUT_DIR", tmp_path / "out")
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "out" / "aligned_widths_quick.json").read_text())
    (case,) = doc["cases"]
    depth = case["variants"]["depth"]
    totals = [w["total"] for w in case["widths"]]
    assert depth["verification_passed"] and depth["budget_met"]
    assert depth["onnx_macs"] == depth["macs"] <= case["variants"]["unaligned"]["macs"]
    assert all(k in (0, t) for k, t in zip(depth["kept"], totals)) and 0 in depth["kept"]
    (row,) = case["timings"]
    assert row["variants"]["depth"]["limit_fraction"] > 0
    assert "depth vs align8" in row["compare"]
    assert "| depth |" in (tmp_path / "aligned_widths_quick.md").read_text()


def test_latency_widths_take_blocks_where_the_table_says_they_cost_most_per_mac(script, resnet20):
    # A synthetic table in which the last stage's convs (8x8 maps; input 8x8, or 16x16 strided into it) cost
    # 50x their MACs' share: every block of channels the allocation takes comes from the last stage's widths.
    import dataclasses

    from sslcompress.latency import LatencyTable, current_key
    from sslcompress.latency.profile import missing_points

    _, _, w = resnet20
    table = LatencyTable(dataclasses.replace(current_key(), block=8))
    for sig, points in missing_points(table, w.st, 8).items():
        last_stage = sig.kind == "conv" and sig.in_hw[0] // sig.stride[0] == 8
        table.entry(sig).points = {(i, o): 1e-4 * i * o * (50 if last_stage else 1) for i, o in points}
    dense = w.macs(set())
    kept, met = script.latency_widths(w, table, 8, math.floor(0.7 * dense))
    assert met and w.macs(w.dead_of(kept)) <= 0.7 * dense
    assert all(k % 8 == 0 for k in kept)
    by_stage = [[k == u.total for u, k in zip(w.units, kept) if u.total == full] for full in (16, 32, 64)]
    assert all(by_stage[0]) and all(by_stage[1]) and not all(by_stage[2])
