"""benchmarks/transformers_zoo.py: a model checked in its own process and written to both results files; a missing
transformers installation refused in one line; the table says where a model falls short."""

from __future__ import annotations

import importlib.util
import json

import pytest
from benchmark_script import benchmark_script


@pytest.fixture(scope="module")
def script():
    with benchmark_script("transformers_zoo") as mod:
        yield mod


def test_without_transformers_it_says_so_in_one_line(script, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    assert script.main(["--models", "vit", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: transformers is not installed")
    assert list(tmp_path.iterdir()) == []


def test_the_table_marks_mismatches_and_errors(script):
    rows = [
        {"model": "a", "groups": {"filter": 4, "head": 2}, "macs": 100, "macs_export": 100, "macs_after_counted": 60,
         "macs_after_export": 60, "verified": True, "thinned": True, "thin_note": "", "walls": [], "ok": True},
        {"model": "b", "groups": {}, "macs": 100, "macs_export": 120, "macs_after_counted": 100,
         "macs_after_export": 120, "verified": True, "thinned": False, "thin_note": "nothing to remove",
         "walls": ["x"], "ok": False},
        {"model": "c", "error": "export failed"},
    ]
    md = script.render(rows, {"date": "d", "transformers": "t", "torch": "p"})
    assert "| a | filter 4, head 2 | yes (100 / 100) | yes (60 / 60) | yes | none |" in md
    assert "| b | none | NO (100 / 120) | NO (100 / 120) | no: nothing to remove | x |" in md
    assert "| c | error: export failed |" in md
    assert md.rstrip().endswith("1 of 3 models counted as exported and cut as counted.")


def test_a_vit_is_counted_as_exported_cut_as_counted_and_thinned(script, tmp_path):
    pytest.importorskip("transformers")
    assert script.main(["--models", "vit", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "transformers_zoo.json").read_text())
    (row,) = doc["rows"]
    assert row["ok"] and row["verified"] and row["thinned"]
    assert row["groups"]["head"] == 8 and row["groups"]["depth"] == 4  # 2 x 4 heads; 2 attention and 2 MLP branches
    assert row["macs"] == row["macs_export"]
    assert row["macs_after_counted"] == row["macs_after_export"] < row["macs"]
    assert "| vit |" in (tmp_path / "transformers_zoo.md").read_text()
