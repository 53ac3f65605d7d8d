"""benchmarks/int8_resnet.py and the zeroing it shares with the other ResNet benchmarks: `--scope all` zeroes the
stem's and every residual trunk's channels too, and the cut deletes them exactly."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from benchmark_script import benchmark_script

from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zeroing():
    with benchmark_script("surgery_resnet") as mod:
        yield mod


@pytest.fixture(scope="module")
def script():
    with benchmark_script("int8_resnet") as mod:
        yield mod


@pytest.mark.parametrize(("name", "trunks"), [("resnet18", 4), ("resnet50", 5)])
def test_each_trunk_is_the_stem_or_a_projection_and_the_blocks_last_convs_after_it(zeroing, name, trunks):
    model, _ = zeroing.sparse_resnet(name, 1.0, 32, 0)
    found = zeroing.trunk_writers(model)
    assert len(found) == trunks
    assert found[0][0][0] == "conv1"
    last = "conv3" if name == "resnet50" else "conv2"
    for writers in found:
        widths = {conv.out_channels for _, conv, _ in writers}
        assert len(widths) == 1  # one trunk, one width
        assert all(n.endswith(last) for n, _, _ in writers[1:])
    assert sum(len(w) - 1 for w in found) == sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))


def test_kept_widths_are_multiples_of_the_alignment(zeroing):
    assert [zeroing.kept_count(n, 0.7) for n in (64, 128, 256, 512)] == [45, 90, 179, 358]
    assert [zeroing.kept_count(n, 0.7, 8) for n in (64, 128, 256, 512)] == [48, 88, 176, 360]
    assert zeroing.kept_count(16, 0.1, 8) == 8 and zeroing.kept_count(12, 1.0, 8) == 12  # one multiple, at most n
    model, z = zeroing.sparse_resnet("resnet18", 0.7, 32, 0, "all", align=8)
    assert z["align"] == 8
    for writers in zeroing.trunk_writers(model):
        conv = writers[0][1]
        live = int((conv.weight.abs().amax(dim=(1, 2, 3)) > 0).sum())
        assert live % 8 == 0 and live == zeroing.kept_count(conv.out_channels, 0.7, 8)


@torch.no_grad()
def test_scope_all_zeroes_trunk_channels_the_cut_deletes_everywhere(zeroing):
    model, z = zeroing.sparse_resnet("resnet18", 0.5, 32, 0, "all")
    assert z["scope"] == "all" and z["trunk_channels_zeroed"] == z["trunk_channels_total"] // 2
    # A zeroed trunk channel is exactly zero after the stem and after every block of its trunk.
    x = torch.randn(2, 3, 32, 32)
    stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    dead = (stem.abs().amax(dim=(0, 2, 3)) == 0).sum().item()
    assert dead == 32
    out = model.layer1(stem)
    assert (out.abs().amax(dim=(0, 2, 3)) == 0).sum().item() == 32
    exported = export_onnx(model, (1, 3, 32, 32), dynamic_batch=True)
    cut = compress(exported.model, shape_lowering="off")
    assert cut.verification.passed
    convs = {n.name: n for n in cut.model.graph.node if n.op_type == "Conv"}
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in cut.model.graph.initializer}
    stem_conv = next(n for n in cut.model.graph.node if n.op_type == "Conv")
    assert weights[stem_conv.input[1]].shape[0] == 32  # the stem writes the kept half of its channels
    kept = cut.report["totals"]["macs_after"] / cut.report["totals"]["macs"]
    assert 0.2 < kept < 0.35, kept  # about a quarter: convs between two halved widths
    assert len(convs) == sum(1 for n in exported.model.graph.node if n.op_type == "Conv")
    fc = next(n for n in cut.model.graph.node if n.op_type in ("Gemm", "MatMul"))
    assert np.prod(weights[fc.input[1]].shape) == 1000 * 256


def test_a_scope_all_run_writes_its_table_under_its_name(script, tmp_path):
    args = ["--models", "resnet18", "--keep", "0.5", "--scope", "all", "--size", "32", "--batch", "1",
            "--repeat", "2", "--warmup", "1", "--calibration", "4", "--out", str(tmp_path),
            "--work", str(tmp_path / "work"), "--name", "small"]
    assert script.main(args) == 0
    doc = json.loads((tmp_path / "small.json").read_text())
    assert doc["scope"] == "all"
    (case,) = doc["cases"]
    assert case["trunks"] == 4 and case["macs_after"] < 0.35 * case["macs"]
    (row,) = case["rows"]
    assert row["target_met"] == (row["int8_on_structured"] >= row["int8_on_dense"])
    md = (tmp_path / "small.md").read_text()
    assert "of the stem's and of every residual trunk's" in md
    assert f"| resnet18 | 50% | {case['macs_after'] / case['macs']:.1%} | 1 | 1 |" in md
