"""The surgery on ONNX models as users bring them: every exporter and export option, and graph
shapes other tools write, each with planted structured zeros (tests/corpus/).

For every corpus entry: `sslcompress.compress` succeeds and its verification passes; the uncut
and the compact model, run here in ONNX Runtime on the same random feeds (each input of its
declared dtype and shape), agree within the entry's tolerance (1e-4 of max |output| for fp32);
and every weighted layer whose outputs were planted zero lost all of them (its output-channel
count in the compact model is the planted-live count), the layers that read those channels lost
the matching inputs, and a zeroed residual branch's convs are gone.

The entries are the specification the surgery must meet; none is expected to fail. The opset
sweep and the dynamo exporter's dynamic exports are `slow` (the whole file takes about 25 s on two
cores): `python -m pytest tests/test_foreign_corpus.py [-m "not slow"]`.
`test_corpus_plants_what_it_records` checks the builders themselves: the planted channels are
exactly zero at their layers' outputs in the uncut model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from corpus import Entry, feeds, layer_problems, run, weighted_layers, with_outputs
from corpus import detector as D
from corpus import handwritten as H
from corpus import torch_models as T

import sslcompress

pytestmark = pytest.mark.usefixtures("one_thread")

SLOW = pytest.mark.slow

BUILDERS: dict[str, Callable[[Path], Entry]] = {}


def _add(name: str, build: Callable[[Path], Entry], *marks) -> pytest.param:
    BUILDERS[name] = build
    return pytest.param(name, id=name, marks=marks)


def _cases() -> list:
    cases = []
    for opset in (*T.OPSETS, T.NEWEST_LEGACY):
        for fold in (True, False):
            name = f"legacy-opset{opset}-fold{int(fold)}"
            cases.append(_add(name, lambda _t, o=opset, f=fold: T.legacy_opset(o, f), *([] if opset == 17 else [SLOW])))
    cases += [
        _add("dynamo", lambda _t: T.dynamo_static()),
        _add("dynamo-dynamic-batch", lambda _t: T.dynamo_dynamic_batch(), SLOW),
        _add("dynamo-dynamic-spatial", lambda _t: T.dynamo_dynamic_spatial(), SLOW),
        _add("legacy-dynamic-batch", lambda _t: T.legacy_dynamic_batch()),
        _add("legacy-dynamic-spatial", lambda _t: T.legacy_dynamic_spatial()),
        _add("legacy-initializers-as-inputs", lambda _t: T.initializers_as_inputs()),
        _add("legacy-external-data", T.external_data),
        _add("legacy-fp16-half", lambda _t: T.fp16_half()),
        _add("fp16-converted", lambda _t: T.fp16_converted()),
        _add("dedup-legacy-fold1", lambda _t: T.dedup_legacy(True)),
        _add("dedup-legacy-fold0", lambda _t: T.dedup_legacy(False)),
        _add("detector-legacy", lambda _t: D.detector_legacy()),
        _add("detector-dynamo-dynamic-batch", lambda _t: D.detector_dynamo_dynamic_batch()),
        _add("detector-legacy-nms", lambda _t: D.detector_legacy_nms()),
        _add("detector-qdq", D.detector_qdq),
        _add("yolo-legacy", lambda _t: D.yolo_legacy()),
        _add("yolo-dynamo-dynamic-batch", lambda _t: D.yolo_dynamo_dynamic_batch()),
    ]
    for build in H.ALL:
        cases.append(_add(build.__name__.replace("_", "-"), lambda _t, b=build: b()))
    return cases


CASES = _cases()


@functools.cache
def entry(name: str, tmp: Path) -> Entry:
    e = BUILDERS[name](tmp)
    assert e.name == name
    return e


@functools.cache
def compressed(name: str, tmp: Path):
    e = entry(name, tmp)
    return sslcompress.compress(e.source, inputs=e.compress_inputs, shape_lowering="off")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


def _outputs_agree(e: Entry, compact: onnx.ModelProto) -> None:
    for seed in (0, 1):
        feed = feeds(e.model, e.dims, seed)
        want, got = run(e.model, feed), run(compact, feed)
        assert set(got) == set(want), (sorted(want), sorted(got))
        for k, w in want.items():
            g = got[k]
            assert g.dtype == w.dtype and g.shape == w.shape, (k, w.dtype, w.shape, g.dtype, g.shape)
            if not np.issubdtype(w.dtype, np.floating):
                np.testing.assert_array_equal(g, w, err_msg=k)
                continue
            w64, g64 = w.astype(np.float64), g.astype(np.float64)
            scale = float(np.max(np.abs(w64)))
            diff = float(np.max(np.abs(w64 - g64)))
            assert np.isfinite(g64).all() and diff <= e.rtol * scale, (
                f"output {k!r}: max |diff| {diff:.3g} > {e.rtol:g} x max |output| {scale:.3g}"
            )


@pytest.mark.parametrize("name", CASES)
def test_compress_is_exact(name, tmp):
    e = entry(name, tmp)
    res = compressed(name, tmp)
    assert res.verification.passed, res.report["verification"]
    onnx.checker.check_model(res.model, full_check=True)
    _outputs_agree(e, res.model)


@pytest.mark.parametrize("name", CASES)
def test_aligned_cut_is_exact(name, tmp):
    # The cut that keeps widths at multiples of 8 keeps some dead channels on every exporter's graph: the
    # outputs stay the uncut model's, and it never keeps less than the plain cut.
    e = entry(name, tmp)
    res = sslcompress.compress(e.source, inputs=e.compress_inputs, shape_lowering="off", align=8)
    assert res.verification.passed, res.report["verification"]
    onnx.checker.check_model(res.model, full_check=True)
    _outputs_agree(e, res.model)
    assert res.report["totals"]["macs_after"] >= compressed(name, tmp).report["totals"]["macs_after"]


@pytest.mark.parametrize("name", CASES)
def test_planted_zeros_are_removed(name, tmp):
    e = entry(name, tmp)
    res = compressed(name, tmp)
    problems = layer_problems(e.model, res.model, e)
    assert not problems, "\n".join([*problems, f"blocked_by: {res.report['blocked_by']}"])


@pytest.mark.parametrize("name", CASES)
def test_corpus_plants_what_it_records(name, tmp):
    """The builder's record is true of the uncut model: planted channels are exactly zero at
    their layers' outputs, the expectations name only existing layers."""
    e = entry(name, tmp)
    layers = weighted_layers(e.model)
    assert set(e.expect) | set(e.expect_in) | set(e.removed) | set(e.planted) <= set(range(len(layers)))
    assert set(e.expect) == set(range(len(layers))) - set(e.removed), "every surviving layer has an expectation"
    probe = with_outputs(e.model, [layers[i].output for i in e.planted])
    got = run(probe, feeds(e.model, e.dims, 0))
    for i, idx in e.planted.items():
        lay = layers[i]
        y = np.moveaxis(got[lay.output], lay.channel_axis, 0)
        assert y.shape[0] > max(idx)
        assert not np.any(y[list(idx)]), f"layer {i} ({lay.name}): planted channels {idx} are not zero"
        live = [c for c in range(y.shape[0]) if c not in idx]
        assert all(np.any(y[c]) for c in live), f"layer {i}: a live channel is zero"


def _reads_through_identity(m: onnx.ModelProto) -> bool:
    ids = {n.output[0] for n in m.graph.node if n.op_type == "Identity"}
    return any(i in ids for n in m.graph.node if n.op_type in ("Conv", "BatchNormalization") for i in n.input[1:])


def _symbolic(m: onnx.ModelProto, axes: tuple[int, ...]) -> bool:
    dims = m.graph.input[0].type.tensor_type.shape.dim
    return all(not dims[a].HasField("dim_value") for a in axes)


def _external(path: Path | None) -> bool:
    m = onnx.load(str(path), load_external_data=False)
    return all(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)


def _bn_nodes(e: Entry) -> bool:
    return any(n.op_type == "BatchNormalization" for n in e.model.graph.node)


def _fp16_input(e: Entry) -> bool:
    return e.model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


# What each entry is in the corpus for: it must stay true of what its builder makes.
COVERS: list[tuple[str, str, Callable[[Entry], bool]]] = [
    ("legacy-opset17-fold0", "BN nodes", _bn_nodes),
    ("legacy-opset17-fold0", "BN params read through Identity", lambda e: _reads_through_identity(e.model)),
    ("legacy-opset17-fold1", "BN folded", lambda e: not _bn_nodes(e)),
    ("legacy-opset17-fold1", "a folded bias read through Identity", lambda e: _reads_through_identity(e.model)),
    ("dynamo", "dynamo node names", lambda e: e.model.graph.node[0].name.startswith("node_")),
    ("dynamo-dynamic-batch", "symbolic batch", lambda e: _symbolic(e.model, (0,))),
    ("dynamo-dynamic-spatial", "symbolic batch, height, width", lambda e: _symbolic(e.model, (0, 2, 3))),
    ("legacy-dynamic-batch", "symbolic batch", lambda e: _symbolic(e.model, (0,))),
    ("legacy-dynamic-spatial", "symbolic batch, height, width", lambda e: _symbolic(e.model, (0, 2, 3))),
    ("legacy-initializers-as-inputs", "initializers listed as inputs",
     lambda e: {t.name for t in e.model.graph.initializer} <= {v.name for v in e.model.graph.input}),
    ("legacy-external-data", "all weights in an external file", lambda e: _external(e.path)),
    ("legacy-fp16-half", "fp16 input", _fp16_input),
    ("fp16-converted", "fp16 input", _fp16_input),
    ("dedup-legacy-fold1", "weights read through Identity", lambda e: _reads_through_identity(e.model)),
    ("dedup-legacy-fold0", "weights read through Identity", lambda e: _reads_through_identity(e.model)),
    ("qdq", "int8 weights behind DequantizeLinear",
     lambda e: any(n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_q") for n in e.model.graph.node)),
    ("two-inputs", "two graph inputs", lambda e: len(e.model.graph.input) == 2),
    ("ir3-initializers-as-inputs", "IR 3, initializers and one more as inputs",
     lambda e: e.model.ir_version == 3 and len(e.model.graph.input) == len(e.model.graph.initializer) + 1),
]


@pytest.mark.parametrize(("name", "what"), [pytest.param(n, w, id=f"{n}:{w}") for n, w, _ in COVERS])
def test_corpus_has_what_users_bring(name, what, tmp):
    (check,) = [c for n, w, c in COVERS if (n, w) == (name, what)]
    assert check(entry(name, tmp))


SAME_NET = [p.values[0] for p in CASES if p.values[0].startswith(("legacy-", "dynamo", "fp16"))
            and "spatial" not in p.values[0]]


@pytest.mark.parametrize("name", SAME_NET)
def test_every_export_of_one_net_reports_its_macs(name, tmp):
    # The same net at the same input size, however it was exported: a Pad built from shape arithmetic
    # or a run-time Reshape target must not hide the sizes behind it (a 3x3 conv counted as 1x1).
    reference = compressed("legacy-opset17-fold1", tmp).report["totals"]
    totals = compressed(name, tmp).report["totals"]
    assert (totals["macs"], totals["macs_after"]) == (reference["macs"], reference["macs_after"])


DETECTORS = [p.values[0] for p in CASES if p.values[0].startswith("detector")]


@pytest.mark.parametrize("name", DETECTORS)
def test_a_shared_head_keeps_one_weight(name, tmp):
    # One head conv runs on every pyramid level: one weight, one Conv node per level. Every level loses the
    # same channels, so the compact model keeps one (smaller) weight per head conv, not a copy per level.
    e, result = entry(name, tmp), compressed(name, tmp)
    n = len(weighted_layers(e.model))

    def sources(m):
        return [D.lay_weight(m, i) for i in range(n)]

    before, after = sources(e.model), sources(result.model)
    assert len(before) - len(set(before)) == 3  # tower, cls and box, read twice each
    assert len(set(after)) == len(set(before)), (before, after)
    totals = result.report["totals"]
    assert totals["params_after"] < totals["params"]
