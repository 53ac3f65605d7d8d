"""benchmarks/trained_of_limit.py end to end on a stand-in run folder: tiny models, two rounds, no timing
asserted; what it reads, how it scores (speed-up times the MAC fraction), and one clear line for a folder that
is not a finished run."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from benchmark_script import benchmark_script

from sslcompress.surgery.export import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def T():
    with benchmark_script("trained_of_limit") as mod:
        yield mod


def _net(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(width, 8, 3, padding=1)).eval()


def test_it_times_the_three_models_and_scores_against_the_limit(T, tmp_path, capsys):
    run, results = tmp_path / "out" / "run1", tmp_path / "results"
    for sub, width in (("", 16), ("macs", 8), ("latency", 12)):
        (run / sub).mkdir(parents=True, exist_ok=True)
        name = "dense.onnx" if not sub else "compact.onnx"
        onnx.save(export_onnx(_net(width), (1, 3, 8, 8), dynamic_batch=True).model, run / sub / name)
    results.mkdir()
    fractions = {"macs": 0.5, "latency": 0.75}
    (results / "run1.json").write_text(json.dumps(
        {"model": "tiny", "result": {"rows": {n: {"macs_fraction": f} for n, f in fractions.items()}}}))
    assert T.main(["--run", "run1", "--work", str(tmp_path / "out"), "--out", str(results), "--rounds", "2",
                   "--threads", "1", "--batches", "1,2"]) == 0
    doc = json.loads((results / "run1_threads.json").read_text())
    assert list(doc["timings"]) == ["t1_b1", "t1_b2"] and doc["mac_fractions"] == {"dense": 1.0, **fractions}
    for row in doc["timings"].values():
        assert row["dense"]["speedup"] == 1.0 and row["dense"]["of_limit"] == 1.0
        for n, f in fractions.items():
            assert row[n]["speedup"] == pytest.approx(row["dense"]["ms"] / row[n]["ms"])
            assert row[n]["of_limit"] == pytest.approx(row[n]["speedup"] * f)
    md = (results / "run1_threads.md").read_text()
    assert "| 1, 2 |" in md and "MAC-targeted (50.0% of the MACs)" in md and "of 4**" in md


def test_a_folder_that_is_not_a_finished_run_is_one_line(T, tmp_path, capsys):
    assert T.main(["--run", "nothing", "--work", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: nothing is not a finished latency_vs_macs.py or depth_vs_width.py run")


def test_a_depth_vs_width_run_is_read_from_its_own_folder(T, tmp_path, capsys):
    """depth_vs_width.py keeps its models in out/depth_vs_width/<variant>_<budget>/ whatever its --name; the
    budgets come from its results, and a model missing there is named in the one line."""
    work, results = tmp_path / "out", tmp_path / "results"
    folder = work / "depth_vs_width"
    folder.mkdir(parents=True)
    onnx.save(export_onnx(_net(16), (1, 3, 8, 8), dynamic_batch=True).model, folder / "dense.onnx")
    for sub, width in (("width_0.5", 8), ("depth_0.62", 12)):
        (folder / sub).mkdir()
        onnx.save(export_onnx(_net(width), (1, 3, 8, 8), dynamic_batch=True).model, folder / sub / "compact.onnx")
    results.mkdir()
    rows = {"width": {"macs_fraction": 0.5, "target_flops": 0.5}, "depth": {"macs_fraction": 0.6, "target_flops": 0.62}}
    (results / "dvw.json").write_text(json.dumps({"benchmark": "depth_vs_width", "align": 8, "result": {"rows": rows}}))
    args = ["--run", "dvw", "--work", str(work), "--out", str(results), "--rounds", "2", "--threads", "1",
            "--batches", "1"]
    assert T.main(args) == 0
    doc = json.loads((results / "dvw_threads.json").read_text())
    assert doc["mac_fractions"] == {"dense": 1.0, "width": 0.5, "depth": 0.6}
    row = doc["timings"]["t1_b1"]
    assert row["depth"]["of_limit"] == pytest.approx(row["dense"]["ms"] / row["depth"]["ms"] * 0.6)
    md = (results / "dvw_threads.md").read_text()
    assert "filter,channel --align 8 (50.0% of the MACs)" in md and "| depth (60.0%) |" in md and "of 2**" in md
    (folder / "depth_0.62" / "compact.onnx").unlink()
    capsys.readouterr()
    assert T.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "depth_0.62" in err[0] and "width_0.5" not in err[0]


def test_the_latency_targeted_attempt_the_run_compared_is_the_one_timed(T, tmp_path, capsys):
    """latency_vs_macs.py may train several latency-targeted attempts (latency/, latency_2/, ...) and compares
    the one whose latency measured nearest the MAC-targeted model's; its results name that folder, and the MAC
    fraction in them is that attempt's. The first attempt's folder here holds no model at all: reading it fails."""
    run, results = tmp_path / "out" / "run2", tmp_path / "results"
    for sub, width in (("", 16), ("macs", 8), ("latency_2", 12)):
        (run / sub).mkdir(parents=True, exist_ok=True)
        name = "dense.onnx" if not sub else "compact.onnx"
        onnx.save(export_onnx(_net(width), (1, 3, 8, 8), dynamic_batch=True).model, run / sub / name)
    (run / "latency").mkdir()
    (run / "latency" / "compact.onnx").write_bytes(b"not a model")
    results.mkdir()
    rows = {"macs": {"macs_fraction": 0.5}, "latency": {"macs_fraction": 0.75, "folder": "latency_2"}}
    (results / "run2.json").write_text(json.dumps({"model": "tiny", "result": {"rows": rows}}))
    args = ["--run", "run2", "--work", str(tmp_path / "out"), "--out", str(results), "--rounds", "2",
            "--threads", "1", "--batches", "1"]
    assert T.main(args) == 0
    doc = json.loads((results / "run2_threads.json").read_text())
    assert doc["mac_fractions"]["latency"] == 0.75 and set(doc["timings"]["t1_b1"]) == {"dense", "macs", "latency"}
    (run / "latency_2" / "compact.onnx").unlink()
    capsys.readouterr()
    assert T.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latency_2" in err[0]
