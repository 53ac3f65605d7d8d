"""`finetune --target-latency MS`: the predicted latency (the profile table's figures at the widths the weights
keep) is a budget metric the controller lands on, as it lands on MACs; the report gives the prediction. The
table here is synthetic (latency proportional to each layer's width product, on profile's own grid), so the
test checks the budget's logic, not this machine's timings."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from finetune_cli import short_finetune

from sslcompress.cli import main
from sslcompress.finetune.structure import analyze
from sslcompress.latency import current_key
from sslcompress.latency.profile import missing_points
from sslcompress.latency.table import LatencyTable, save_table
from sslcompress.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 1, 28, 28)


def _synthetic_table(path, cost=lambda i, o: 1e-3 * i * o, model: str = "lenet5", block: int | None = None) -> float:
    """The model's table with `cost(in, out)` ms per layer (by default in * out microseconds); returns the dense
    prediction (ms). Keyed for this machine, or for a CPU of channel block `block`."""
    torch.manual_seed(0)
    spec = ModelSpec(model, 10, 1, (28, 28)) if model == "lenet5" else ModelSpec(model, 10, 3, (32, 32))
    structure = analyze(build_model(spec), spec.input_shape)
    key = current_key()
    table = LatencyTable(key if block is None else dataclasses.replace(key, block=block))
    for sig, points in missing_points(table, structure, 8).items():
        table.entry(sig).points = {(i, o): cost(i, o) for i, o in points}
    save_table(table, path)
    return sum(cost(lay.weight_shape[1], lay.weight_shape[0]) for lay in structure.layers.values())




def test_the_run_lands_on_the_predicted_latency(tmp_path):
    table = tmp_path / "table.json"
    dense_ms = _synthetic_table(table)
    asked = 0.4 * dense_ms
    out, res = short_finetune(tmp_path, "--target-latency", f"{asked:.6f}", "--latency-table", str(table))
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    lat, budget = report["latency"], report["budget"]
    assert lat["dense_ms"] == pytest.approx(dense_ms)
    assert lat["predicted_ms"] <= asked and lat["predicted_ms"] >= asked - 0.01 * dense_ms - 1e-9
    assert budget["latency"]["asked"] == pytest.approx(0.4, rel=1e-5)
    assert budget["latency"]["reached"] == pytest.approx(lat["predicted_ms"] / dense_ms)
    # The MACs were not asked, but fell with the latency (this table's cost is each layer's width product).
    assert budget["macs"]["asked"] is None and budget["macs"]["reached"] < 0.9

    # The export times the compact model in the table's session beside the uncut one and reports both.
    export_report = tmp_path / "export.json"
    res = CliRunner().invoke(main, ["export", str(out / "sparse.pt"), "--onnx", str(tmp_path / "c.onnx"),
                                    "--report", str(export_report)])
    assert res.exit_code == 0, res.output
    assert "predicted/measured" in res.output
    measured = json.loads(export_report.read_text())["latency"]
    assert measured["predicted_ms"] == lat["predicted_ms"]
    assert measured["measured_ms"] > 0 and measured["uncut_measured_ms"] > 0
    assert measured["predicted_over_measured"] == pytest.approx(lat["predicted_ms"] / measured["measured_ms"])
    assert "note" not in measured

    # Cut with --align, the compact model keeps more than the widths the table predicted: measured all the same,
    # and the row says its prediction is of the checkpoint's widths.
    aligned_report = tmp_path / "export_aligned.json"
    res = CliRunner().invoke(main, ["export", str(out / "sparse.pt"), "--onnx", str(tmp_path / "a.onnx"),
                                    "--report", str(aligned_report), "--align", "32"])
    assert res.exit_code == 0, res.output
    aligned = json.loads(aligned_report.read_text())
    assert aligned["totals"]["macs_after"] > aligned["predicted_macs_after"]
    assert aligned["latency"]["measured_ms"] > 0
    assert aligned["latency"]["note"].startswith("predicted for the checkpoint's widths; --align 32 kept")
    assert "--align 32 kept" in res.output


def test_no_table_is_one_line_naming_the_profile_command(tmp_path):
    out, res = short_finetune(tmp_path, "--target-latency", "0.1", "--latency-table", str(tmp_path / "none.json"))
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "sslcompress profile --model lenet5" in lines[0], res.output
    # Said before any training: no baseline was pretrained (none was given) and nothing was written.
    assert "baseline" not in lines[0] and not (out / "pretrained.pt").exists()


def test_a_table_of_another_session_is_refused(tmp_path):
    table = tmp_path / "table.json"
    _synthetic_table(table)
    _, res = short_finetune(tmp_path, "--target-latency", "0.1", "--latency-table", str(table), "--latency-batch", "8")
    assert res.exit_code == 2 and "measured for" in res.output, res.output


def _padded(pad: int, off_block: float, block: int = 8):
    """A conv cost that pads input widths up to multiples of `pad`, `off_block` times slower off the blocks."""
    return lambda i, o: 1e-3 * o * (-(-i // pad) * pad) * (off_block if i % block and i > block else 1.0)


@pytest.mark.parametrize(("pad", "off_block", "step"), [(16, 1.3, 16), (1, 1.3, 8), (1, 1.0, 1)])
def test_the_channel_step_read_from_a_table(tmp_path, pad, off_block, step):
    from sslcompress.latency.step import channel_step
    from sslcompress.latency.table import load_table

    # A CPU of blocks of 8 (AVX2). resnet20's convs are 16 to 64 wide: widths of 16m + 8 between their
    # neighbours to read the padding from.
    _synthetic_table(tmp_path / "t.json", _padded(pad, off_block), "resnet20", block=8)
    assert channel_step(load_table(tmp_path / "t.json")).step == step


def test_padding_is_not_read_from_convs_of_a_few_microseconds(tmp_path):
    from sslcompress.latency.step import MIN_SPAN_MS, channel_step
    from sslcompress.latency.table import load_table

    # The same padded costs, scaled down until the widest span between neighbours is under the profiler's
    # resolution: the off-block slowdown (a ratio) still reads, the padding (a difference) no longer does.
    def tiny(i, o):
        return 1e-2 * MIN_SPAN_MS * _padded(16, 1.3)(i, o) / (64 * 16 * 1e-3)

    _synthetic_table(tmp_path / "t.json", tiny, "resnet20", block=8)
    step = channel_step(load_table(tmp_path / "t.json"))
    assert step.step == 8 and step.midway_position is None and step.off_block_ratio > 1.05


def test_the_channel_step_of_a_cpu_with_blocks_of_16(tmp_path):
    from sslcompress.latency.step import channel_step
    from sslcompress.latency.table import load_table

    # AVX-512F: off the multiples of 16 is off the blocks.
    _synthetic_table(tmp_path / "t.json", _padded(1, 1.3, block=16), "resnet20", block=16)
    assert channel_step(load_table(tmp_path / "t.json")).step == 16


def test_align_auto_aligns_to_the_tables_step(tmp_path, monkeypatch):
    # LeNet's conv inputs (1 and 20 channels) can show a block of 8 but none of 16 (no input of 32 or more), so
    # the machine is taken for an AVX2 CPU's, block 8, on any host (on an AVX-512F one the step is 1: honest,
    # but not what this test reads).
    import sslcompress.latency.key as key_module

    monkeypatch.setattr(key_module, "nchwc_block", lambda provider="cpu": 8)
    table = tmp_path / "table.json"
    block = current_key().block
    assert block == 8
    _synthetic_table(table, _padded(1, 1.3, block))  # off-block convs slower: a step of this CPU's block
    _, res = short_finetune(tmp_path, "--target-flops", "0.4", "--align", "auto", "--latency-table", str(table))
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["align"] == block
    assert report["widths"] and all(w["kept"] % block == 0 or not w["aligned"] for w in report["widths"]), \
        report["widths"]
    assert any(w["aligned"] and w["kept"] < w["total"] for w in report["widths"])


def test_export_measures_where_it_can_and_says_what_it_compares(tmp_path):
    """The export times the compact model where it runs: a table of another host is said beside the figures
    (they are two machines'), and a provider this onnxruntime lacks is a note, not a failed export."""
    import onnxruntime as ort

    from sslcompress.finetune.checkpoint import load_checkpoint, save_checkpoint

    table = tmp_path / "table.json"
    dense_ms = _synthetic_table(table)
    out, res = short_finetune(tmp_path, "--target-latency", f"{0.5 * dense_ms:.6f}", "--latency-table", str(table))
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(out / "sparse.pt")
    row = ckpt.report["latency"]
    assert row["table_key"] == current_key().to_dict()

    def export(name: str, latency: dict) -> tuple[dict, object]:
        path = tmp_path / f"{name}.pt"
        save_checkpoint(path, dataclasses.replace(ckpt, report={**ckpt.report, "latency": latency}))
        report = tmp_path / f"{name}.json"
        res = CliRunner().invoke(main, ["export", str(path), "--onnx", str(tmp_path / f"{name}.onnx"),
                                        "--report", str(report)])
        assert res.exit_code == 0, res.output
        return json.loads(report.read_text())["latency"], res

    key = {**row["table_key"], "machine": "Another CPU", "cpus": 64}
    other, res = export("other", {**row, "table_key": key})
    assert other["measured_ms"] > 0 and "relative_predicted_over_measured" in other
    assert other["note"].startswith("the table was profiled on another host (CPU Another CPU there, ")
    assert "cores 64 there" in other["note"] and "two machines'" in res.output
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        cuda, res = export("cuda", {**row, "provider": "cuda"})
        assert "measured_ms" not in cuda and (tmp_path / "cuda.onnx").is_file()
        assert cuda["note"].startswith("not measured: --provider cuda needs onnxruntime-gpu"), cuda["note"]
