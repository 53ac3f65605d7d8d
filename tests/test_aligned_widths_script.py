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
