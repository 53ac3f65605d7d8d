"""Where ORT reorders between its blocked and plain layouts, and what the prediction charges for it."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from sslcompress.finetune.counting import Counter
from sslcompress.finetune.structure import analyze
from sslcompress.latency import current_key
from sslcompress.latency.block import nchwc_block
from sslcompress.latency.layout import Reorder, reorders
from sslcompress.latency.predict import kept_widths, reorder_out_ms, reorders_ms
from sslcompress.latency.profile import _cut, half_variant, off_block_variant, random_variant
from sslcompress.latency.signature import signatures_of
from sslcompress.latency.table import LatencyTable, ModelTiming, WholeRun
from sslcompress.models import ModelSpec, build_model

RESNET = (1, 3, 32, 32)


def _resnet20():
    torch.manual_seed(0)
    return build_model(ModelSpec("resnet20", 10, 3, (32, 32))).eval()


def _ort_reorders(model: onnx.ModelProto) -> int:
    """Reorders in ORT's optimised graph, less the one after a global pool (a pixel per channel, which the
    prediction leaves out)."""
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath).graph
    writer = {out: n.op_type for n in graph.node for out in n.output}
    return sum(1 for n in graph.node if n.op_type in ("ReorderInput", "ReorderOutput")
               and writer.get(n.input[0]) != "GlobalAveragePool")


@pytest.mark.parametrize("variant", ["half", "off-block", "random-aligned", "random"])
def test_the_reorders_counted_are_the_ones_ort_puts_in(variant):
    block = nchwc_block()
    if block <= 1:
        pytest.skip("this CPU has no blocked conv layout in onnxruntime")
    model = _resnet20()
    structure = analyze(model, RESNET)
    narrowed = {"half": lambda: half_variant(model, RESNET, structure, block),
                "off-block": lambda: off_block_variant(model, RESNET, structure),
                "random-aligned": lambda: random_variant(model, RESNET, structure, seed=1, block=block, aligned=True),
                "random": lambda: random_variant(model, RESNET, structure, seed=0, block=block)}[variant]()
    cut = _cut(narrowed, RESNET)
    assert cut is not None
    widths = kept_widths(structure, Counter(narrowed, RESNET, structure).count())
    counted = reorders(structure, widths, block)
    # A conv writing a part block leaves ORT's blocked layout there: then some reorder is counted, else none
    # (half of ResNet-20's widths fill blocks of 8 but not of 16; aligned ones fill the block they are made for).
    off_blocks = any(cout % block for name, (_, cout) in widths.items() if structure.layers[name].kind == "conv")
    assert bool(counted) == off_blocks
    seen = _ort_reorders(cut)
    if variant in ("half", "off-block"):
        assert len(counted) == seen
    else:
        # ORT reorders a tensor two convs read once (a stage's first conv and its downsample), and the trunk's
        # last writer feeds the pool, not a conv: the count may charge one or two more, never fewer.
        assert seen <= len(counted) <= seen + 2


def test_a_dense_model_whose_widths_fill_blocks_has_no_reorders():
    model = _resnet20()
    structure = analyze(model, RESNET)
    assert reorders(structure, kept_widths(structure), 16) == []
    assert reorders(structure, kept_widths(structure), 1) == []  # no blocks, no layouts


def test_narrower_than_a_block_each_writer_is_reordered_for_its_plain_readers():
    model = _resnet20()
    structure = analyze(model, RESNET)
    widths = kept_widths(structure)
    stage1 = [n for n in widths if n == "conv1" or n.startswith("layer1.")]
    for name in stage1:  # every stage-1 width 12 of 16: blocked convs reading 12 channels in place
        widths[name] = (12 if name != "conv1" else 3, 12)
    if "layer2.0.downsample.0" in widths:
        widths["layer2.0.downsample.0"] = (12, widths["layer2.0.downsample.0"][1])
    widths["layer2.0.conv1"] = (12, widths["layer2.0.conv1"][1])
    got = reorders(structure, widths, 16)
    assert got == sorted((Reorder(n, "out") for n in stage1), key=lambda r: (r.layer, r.side))


def _table_with_curve(block: int = 16) -> tuple[LatencyTable, object, object]:
    model = _resnet20()
    structure = analyze(model, RESNET)
    key = dataclasses.replace(current_key(), block=block)
    table = LatencyTable(key)
    lay = structure.layers["layer1.0.conv1"]
    sig = signatures_of(lay)[0]
    entry = table.entry(sig)
    for i in (8, 16):
        for o in (8, 16):
            entry.points[(i, o)] = 1.0
            entry.reorders[(i, o)] = (0.0 if i < block else 0.02, 0.03 if o == 16 else 0.025)
    # a part block of more than half a block is the slow one (as MLAS moves it)
    table.reorder_curves["32x32"] = {w: (0.06 if 8 < w < 16 else 0.02) for w in range(1, block + 2)}
    table.reorder_curves["32x32"][16] = 0.03
    table.reorder_curves["32x32"][17] = 0.04
    return table, structure, lay


def test_a_part_block_reorder_is_read_from_the_curve():
    table, structure, lay = _table_with_curve()
    assert reorder_out_ms(table, lay, (12, 12)) == pytest.approx(0.06)  # one part block: the curve alone
    assert reorder_out_ms(table, lay, (12, 16)) == pytest.approx(0.03)  # a whole block: the conv's own point


def test_without_a_curve_the_convs_own_points_are_read():
    table, structure, lay = _table_with_curve()
    table.reorder_curves.clear()
    assert reorder_out_ms(table, lay, (12, 8)) == pytest.approx(0.025)


def test_the_prediction_adds_the_reorders_and_the_calibration_fits_what_is_left():
    table, structure, _ = _table_with_curve()
    model = _resnet20()
    for sig in {s for lay in structure.layers.values() for s in signatures_of(lay)}:
        entry = table.entry(sig)
        if not entry.points:
            for i in (sig.in_full // 2, sig.in_full):
                for o in (sig.out_full // 2, sig.out_full):
                    entry.points[(i, o)] = 0.01
                    entry.reorders[(i, o)] = (0.001, 0.002)
    for hw in ("16x16", "8x8"):
        table.reorder_curves[hw] = {w: 0.001 for w in range(1, 18)}
    count = Counter(model, RESNET, structure).count()
    assert reorders_ms(table, structure, count) == 0.0  # dense: every width fills its blocks
    runs = [WholeRun("dense", 2.0, 1.5, 0.0, 0.0), WholeRun("half", 1.3, 0.7, 0.0, 0.3),
            WholeRun("odd", 2.5, 0.5, 1.2, 0.4)]
    # total = 0.2 + 1.2 B + 1.0 P + R, exactly
    runs = [dataclasses.replace(r, total_ms=0.2 + 1.2 * r.blocked_ms + 1.0 * r.plain_ms + r.reorder_ms) for r in runs]
    constant, a_blocked, a_plain = ModelTiming("m", runs).calibration()
    assert (constant, a_blocked, a_plain) == pytest.approx((0.2, 1.2, 1.0))
