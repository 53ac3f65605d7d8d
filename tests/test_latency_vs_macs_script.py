"""benchmarks/latency_vs_macs.py: how the latency-targeted attempts move their target, and reusing finished runs.

Nothing here trains or times.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from benchmark_script import benchmark_script


@pytest.fixture(scope="module")
def L():
    with benchmark_script("latency_vs_macs") as mod:
        yield mod


def attempt(asked: float, ratio: float) -> dict:
    return {"asked_ms": asked, "measured_over_macs_model": ratio}


def test_first_correction_is_by_the_measured_ratio(L):
    assert L.next_target([attempt(0.8, 1.25)]) == pytest.approx(0.64)


def test_secant_lands_on_a_power_law(L):
    # Measured latency as a power of the asked one: the secant in logs finds the match in one step.
    def ratio(t):
        return (t / 0.75) ** 0.6

    got = L.next_target([attempt(0.689, ratio(0.689)), attempt(0.810, ratio(0.810))])
    assert got == pytest.approx(0.75, rel=1e-9)


def test_secant_uses_the_two_attempts_nearest_the_match(L):
    def ratio(t):
        return (t / 0.75) ** 0.6

    far = attempt(0.3, 0.5)  # off the power law, and far from the match: left out
    got = L.next_target([far, attempt(0.7, ratio(0.7)), attempt(0.8, ratio(0.8))])
    assert got == pytest.approx(0.75, rel=1e-9)


def test_secant_step_is_bounded(L):
    # Nearly flat: an unbounded secant would jump far; the step stays within a factor 1.5.
    got = L.next_target([attempt(0.80, 1.099), attempt(0.81, 1.100)])
    assert got == pytest.approx(0.80 / 1.5)


def test_no_rising_slope_falls_back_to_the_ratio(L):
    # Asking less measured more (noise), or one target asked twice: the nearest attempt's ratio step.
    assert L.next_target([attempt(0.80, 1.10), attempt(0.81, 1.099)]) == pytest.approx(0.81 / 1.099)
    assert L.next_target([attempt(0.8, 1.1), attempt(0.8, 1.2)]) == pytest.approx(0.8 / 1.1)


def test_reuse_reads_a_finished_run_of_the_same_settings_only(L, tmp_path, monkeypatch):
    settings = {"structures": ("filter", "channel"), "target_latency": 0.7}
    for name, doc in (("report.json", {"accuracy": 1}), ("surgery.json", {"totals": {}})):
        (tmp_path / name).write_text(json.dumps(doc))
    (tmp_path / "compact.onnx").write_bytes(b"x")
    (tmp_path / "settings.json").write_text(json.dumps({"settings": settings, "train_s": 12.0}))
    calls = []
    monkeypatch.setattr(L, "finetune", lambda *a: calls.append("finetune") or ({"accuracy": 2}, 1.0))
    monkeypatch.setattr(L, "export_compact", lambda *a: calls.append("export") or {"totals": {"new": 1}})
    args = SimpleNamespace(reuse=True, model="resnet20")
    assert L.trained(args, Path("w.pt"), tmp_path, settings) == ({"accuracy": 1}, 12.0, {"totals": {}})
    assert calls == []
    other = {**settings, "target_latency": 0.6}
    assert L.trained(args, Path("w.pt"), tmp_path, other) == ({"accuracy": 2}, 1.0, {"totals": {"new": 1}})
    assert calls == ["finetune", "export"]
    assert json.loads((tmp_path / "settings.json").read_text())["settings"]["target_latency"] == 0.6
    calls.clear()
    assert L.trained(SimpleNamespace(reuse=False, model="resnet20"), Path("w.pt"), tmp_path, other)[0] == {"accuracy": 2}
    assert calls == ["finetune", "export"]


def test_unreachable_attempts_are_left_out_of_the_next_target_and_shown(L):
    tried = [attempt(0.8, 1.25), {"asked_ms": 0.5, "unreachable": "cannot be met", "folder": "latency_2"}]
    assert L.next_target(tried) == pytest.approx(0.64)
    doc = {"date_utc": "d", "command": "c", "target_flops": 0.5, "align": 8, "match": 0.05,
           "machine": {"nproc": 2, "load_average_at_end": [1.0, 1.0, 1.0]},
           "result": {"timed_ms": {"1": {"dense": 1.0, "macs": 0.6, "latency": 0.62}}, "dense_predicted_ms": 1.0,
                      "rows": {n: {"accuracy": {"before": 0.9, "after_finetune": 0.8}, "macs_fraction": 0.5,
                                   "widths": [[8, 16]], "latency": {"predicted_ms": 0.6}, "asked_ms": 0.6}
                               for n in ("macs", "latency")},
                      "attempts": [{**tried[0], "predicted_ms": 0.79, "accuracy": 0.8}, tried[1]]}}
    md = L.render_md(doc)
    assert "| 2 | 0.500 | not reachable at this channel step | - | - |" in md


def test_latency_runs_take_their_own_channel_step(L):
    args = SimpleNamespace(strength=0.005, align="auto", sparsify_epochs=1, finetune_epochs=2, lr=0.02,
                           finetune_lr=0.01, batch_size=128, structures=("filter", "channel"))
    assert L.settings(args, target_flops=0.5)["align"] == "auto"
    assert L.settings(args, "latency", 8, target_latency=0.4)["align"] == 8
    assert L.settings(args, "latency", None, target_latency=0.4)["align"] is None  # --latency-align 1: none


def test_parsed_latency_align(L, monkeypatch):
    seen = {}
    monkeypatch.setattr(L, "ready", lambda args: seen.setdefault("args", args) and "stop here")
    for given, want in ((None, "auto"), ("8", 8), ("1", None), ("auto", "auto")):
        argv = ["--align", "auto"] + (["--latency-align", given] if given else [])
        assert L.main(argv) == 2
        assert seen.pop("args").latency_align == want


def test_structures_reach_both_runs_and_a_wrong_one_is_one_line(L, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(L, "ready", lambda args: seen.setdefault("args", args) and "stop here")
    assert L.main(["--structures", "filter,channel,depth"]) == 2
    args = seen.pop("args")
    assert args.structures == ("filter", "channel", "depth")
    for run in (L.settings(args, target_flops=0.5), L.settings(args, "latency", 8, target_latency=0.4)):
        assert run["structures"] == ("filter", "channel", "depth")
        assert run["lambdas"] == {"filter": args.strength, "channel": args.strength, "depth": args.strength}
    capsys.readouterr()
    assert L.main(["--structures", "filter,rows"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown group kind(s) rows") and "args" not in seen


def test_the_results_name_structures_other_than_the_default(L):
    doc = {"date_utc": "d", "command": "c", "target_flops": 0.5, "align": 8, "match": 0.05,
           "machine": {"nproc": 2, "load_average_at_end": [1.0, 1.0, 1.0]},
           "result": {"timed_ms": {"1": {"dense": 1.0, "macs": 0.6, "latency": 0.62}}, "dense_predicted_ms": 1.0,
                      "rows": {n: {"accuracy": {"before": 0.9, "after_finetune": 0.8}, "macs_fraction": 0.5,
                                   "widths": [[8, 16]], "latency": {"predicted_ms": 0.6}, "asked_ms": 0.6}
                               for n in ("macs", "latency")}}}
    assert "| --target-flops 0.5 --align 8 |" in L.render_md(doc)  # a run from before the option
    md = L.render_md({**doc, "structures": ["filter", "channel", "depth"]})
    assert "| --target-flops 0.5 --align 8 -s filter,channel,depth |" in md
    assert "--align 8 -s filter,channel,depth --weighting latency" not in md  # no latency_weighting in doc
    assert "-s filter,channel,depth --weighting none" in md


def test_reuse_reads_back_the_target_a_finished_attempt_was_asked(L, tmp_path):
    """The asked target follows a fresh timing of the MAC-targeted model, so it moves a little in every run: a
    finished attempt whose other settings match is read back at its own target, one that differs is not."""
    settings = {"structures": ["filter", "channel"], "align": 8, "target_latency": 0.6061, "latency_table": "t.json"}
    assert L.earlier_target(tmp_path, settings) is None  # nothing there
    (tmp_path / "settings.json").write_text(json.dumps({"settings": settings, "train_s": 3.0}))
    assert L.earlier_target(tmp_path, settings) is None  # recorded, but its models are not all there
    for name in ("report.json", "surgery.json", "compact.onnx"):
        (tmp_path / name).write_text("{}")
    asked_now = {**settings, "structures": ("filter", "channel"), "target_latency": 0.6058}
    assert L.earlier_target(tmp_path, asked_now) == 0.6061
    assert L.earlier_target(tmp_path, {**asked_now, "align": 16}) is None
    assert L.earlier_target(tmp_path, {**asked_now, "structures": ("filter", "channel", "depth")}) is None
    (tmp_path / "settings.json").write_text(json.dumps({"settings": {**settings, "target_latency": None},
                                                         "train_s": 3.0}))
    assert L.earlier_target(tmp_path, asked_now) is None  # a MAC-targeted run's folder
