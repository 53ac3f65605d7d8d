"""benchmarks/depth_vs_width.py: the two runs' settings and the table it writes. Nothing here trains or times."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from benchmark_script import benchmark_script


@pytest.fixture(scope="module")
def D():
    with benchmark_script("depth_vs_width") as mod:
        yield mod


def _args(**kw):
    base = dict(strength=0.005, align=8, target_flops=0.5, depth_flops=None, sparsify_epochs=1, finetune_epochs=2,
                lr=0.02, finetune_lr=0.01, batch_size=128, data_spec="cifar10:/data.npz", limit_train=None,
                limit_test=None, seed=0, reuse=True)
    base.update(kw)
    return SimpleNamespace(**base)


def test_the_runs_differ_only_in_their_structures_and_alignment(D):
    width, depth = D.settings(_args(), "width"), D.settings(_args(), "depth")
    assert width["structures"] == ("filter", "channel") and width["align"] == 8
    assert depth["structures"] == ("depth",) and depth["align"] is None
    assert set(depth["lambdas"]) == {"depth"} and set(width["lambdas"]) == {"filter", "channel"}
    same = {k for k in width if k not in ("structures", "lambdas", "align")}
    assert all(width[k] == depth[k] for k in same) and width["target_flops"] == 0.5
    # --depth-flops moves the depth run's budget alone (to meet the width run's latency).
    moved = _args(depth_flops=0.62)
    assert D.settings(moved, "depth")["target_flops"] == 0.62 and D.settings(moved, "width")["target_flops"] == 0.5


def test_reuse_reads_a_finished_run_of_the_same_settings_only(D, tmp_path, monkeypatch):
    import json

    args = _args()
    run_settings = D.settings(args, "depth")
    calls = []
    monkeypatch.setattr(D, "finetune", lambda *a: calls.append("train") or ({"fresh": True}, 1.0))

    def export(_args, _sparse, folder):
        for name in ("report.json", "surgery.json", "compact.onnx"):
            (folder / name).write_text(json.dumps({"written": True}))
        return {"fresh": True}

    monkeypatch.setattr(D, "export_compact", export)
    folder = tmp_path / "depth_0.5"
    folder.mkdir()
    first = D.trained(args, tmp_path / "pretrained.pt", folder, run_settings)
    assert calls == ["train"] and first[0] == {"fresh": True}
    again = D.trained(args, tmp_path / "pretrained.pt", folder, run_settings)
    assert calls == ["train"] and again == ({"written": True}, 1.0, {"written": True})
    # Other data, or other settings: trained again.
    D.trained(_args(limit_train=100), tmp_path / "pretrained.pt", folder, run_settings)
    D.trained(args, tmp_path / "pretrained.pt", folder, D.settings(_args(depth_flops=0.6), "depth"))
    assert calls == ["train"] * 3


def test_a_row_counts_the_blocks_the_cut_removed(D):
    report = {"accuracy": {"before": 0.77, "after_finetune": 0.75}, "layers": [{"filters": [0, 16]}]}
    surgery = {"totals": {"macs": 200, "macs_after": 96, "params_after": 10},
               "blocks_removed": ["a", "b"], "blocks_constant": ["c"]}
    r = D.row(report, surgery, 12.0)
    assert r["macs_fraction"] == 0.48 and r["blocks_removed"] == 2 and r["blocks_constant"] == 1
    assert r["widths"] == [[0, 16]]


def test_the_table_gives_each_run_its_speed_up_and_share_of_the_mac_limit(D):
    rows = {"width": {"accuracy": {"after_finetune": 0.75}, "macs_fraction": 0.5, "blocks_removed": 0,
                      "blocks_constant": 0, "widths": [], "target_flops": 0.5},
            "depth": {"accuracy": {"after_finetune": 0.7}, "macs_fraction": 0.48, "blocks_removed": 5,
                      "blocks_constant": 0, "widths": [], "target_flops": 0.62}}
    doc = {"date_utc": "now", "command": "python benchmarks/depth_vs_width.py", "target_flops": 0.5, "align": 8,
           "machine": {"cpu": "cpu", "nproc": 2, "load_average_at_end": [1.0, 1.0, 1.0]},
           "result": {"rows": rows, "dense_accuracy": 0.77,
                      "timed_ms": {"1": {"dense": 1.0, "width": 0.625, "depth": 0.5}}}}
    md = D.render_md(doc)
    assert "| filter,channel --align 8 --target-flops 0.5 | 75.00% | 50.0% | 0 / 0 | 0.625 (1.60x; 0.80) |" in md
    assert "| depth --target-flops 0.62 | 70.00% | 48.0% | 5 / 0 | 0.500 (2.00x; 0.96) |" in md
    assert "| dense | 77.00% | 100% | - | 1.000 |" in md
