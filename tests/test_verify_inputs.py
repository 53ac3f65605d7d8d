"""Verification of models beyond one float32 input: feeds of every dtype, per-dtype tolerances, and
selections (TopK, NonMaxSuppression, ArgMax) compared up to ties. Tiny graphs made with onnx.helper;
every check runs a reference against a deliberately changed candidate that must fail."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from sslcompress.errors import DataError, UnsupportedModelError, VerificationError
from sslcompress.surgery.diverge import first_diverging_node
from sslcompress.surgery.inputs import INT_HIGH, InputSpec, check_verifiable, describe_inputs, random_batches
from sslcompress.surgery.verify import (
    FP16_RTOL,
    compare,
    compare_runners,
    ort_runner,
    output_rtol,
    verify_or_raise,
)


def _model(nodes, inputs, outputs, inits=(), *, opset: int = 17, ir: int = 8) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", inputs, outputs, [nh.from_array(np.asarray(v), k) for k, v in inits])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model)
    return model


def _vi(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, elem, shape)


def _strict(reference: onnx.ModelProto, candidate: onnx.ModelProto, n: int = 4):
    """The plain positional comparison, without the selection rule: what ties would fail."""
    feeds = random_batches(reference, n_random=n)
    return compare_runners(ort_runner(reference), ort_runner(candidate), feeds, 1e-4)


# ----------------------------------------------------------------------------- feeds of every dtype

RNG = np.random.default_rng(3)
TABLE = RNG.standard_normal((INT_HIGH, 5)).astype(np.float32)
W45 = RNG.standard_normal((4, 5)).astype(np.float32)


def _two_inputs(table=TABLE, shift_ids: int = 0) -> onnx.ModelProto:
    """y = table[idx] + (x @ W)[:, None]; ids = idx + shift_ids (an integer output)."""
    return _model(
        [h.make_node("MatMul", ["x", "W"], ["z"]), h.make_node("Unsqueeze", ["z", "one"], ["z1"]),
         h.make_node("Gather", ["table", "idx"], ["g"], axis=0, name="gather"), h.make_node("Add", ["g", "z1"], ["y"]),
         h.make_node("Add", ["idx", "shift"], ["ids"])],
        [_vi("x", T.FLOAT, ["batch", 4]), _vi("idx", T.INT64, ["batch", 3])],
        [_vi("y", T.FLOAT, ["batch", 3, 5]), _vi("ids", T.INT64, ["batch", 3])],
        [("W", W45), ("one", np.array([1], np.int64)), ("table", table), ("shift", np.array(shift_ids, np.int64))])


def test_two_inputs_float_and_int64_indices():
    ref = _two_inputs()
    assert describe_inputs(ref) == (InputSpec("x", np.dtype(np.float32), (None, 4), ("batch", None)),
                                    InputSpec("idx", np.dtype(np.int64), (None, 3), ("batch", None)))
    feeds = random_batches(ref, n_random=3, seed=1)
    for feed in feeds:
        assert list(feed) == ["x", "idx"]
        assert feed["x"].dtype == np.float32 and feed["x"].shape == (2, 4)
        assert feed["idx"].dtype == np.int64 and feed["idx"].shape == (2, 3)
    ids = np.concatenate([f["idx"].ravel() for f in feeds])
    assert ids.min() >= 0 and ids.max() < INT_HIGH and len(set(ids.tolist())) > 3
    again = random_batches(ref, n_random=3, seed=1)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(feeds, again) for k in a)

    same = compare(ref, ref)
    assert same.passed and same.max_abs == 0.0 and same.n_inputs == 4
    moved = compare(ref, _two_inputs(table=TABLE + 0.5))
    assert not moved.passed and moved.where == "output 'y'"
    # An integer output must match exactly: off by one fails with a tolerance of 0.
    ids_off = compare(ref, _two_inputs(shift_ids=1))
    assert not ids_off.passed and ids_off.where == "output 'ids'" and ids_off.rtol == 0.0
    with pytest.raises(VerificationError, match="must match exactly"):
        verify_or_raise(ref, _two_inputs(shift_ids=1))


def test_feeds_by_name_and_their_refusals():
    ref = _two_inputs()
    feed = {"x": np.ones((5, 4)), "idx": np.arange(15, dtype=np.int32).reshape(5, 3) % INT_HIGH}
    assert compare(ref, ref, [feed], n_random=0).passed  # float64 and int32 cast within their kind
    assert not compare(ref, _two_inputs(shift_ids=1), [feed], n_random=0).passed
    with pytest.raises(DataError, match=r"exactly one input, this one has 2 \('x', 'idx'\)"):
        compare(ref, ref, [np.ones((2, 4), np.float32)], n_random=0)
    with pytest.raises(DataError, match="lacks 'idx'"):
        compare(ref, ref, [{"x": np.ones((2, 4), np.float32)}], n_random=0)
    with pytest.raises(DataError, match="float32, the model takes int64"):
        compare(ref, ref, [{"x": np.ones((2, 4), np.float32), "idx": np.ones((2, 3), np.float32)}], n_random=0)
    with pytest.raises(DataError, match=r"shape 2x4x1, the model's input is \?x4"):
        check_verifiable(ref, [{"x": np.ones((2, 4, 1), np.float32), "idx": np.ones((2, 3), np.int64)}])


def test_symbolic_dims_are_shared_by_name():
    # 'n' leads input a, so it is the batch wherever it appears; 'seq' is nobody's batch.
    model = _model([h.make_node("MatMul", ["a", "b"], ["y"]), h.make_node("Identity", ["c"], ["z"])],
                   [_vi("a", T.FLOAT, ["n", 3]), _vi("b", T.FLOAT, [3, "n"]), _vi("c", T.INT32, [1, "seq"])],
                   [_vi("y", T.FLOAT, ["n", "n"]), _vi("z", T.INT32, [1, "seq"])])
    with pytest.raises(UnsupportedModelError, match=r"Input 'c' has a dynamic dimension 1 \('seq'\).*real feeds"):
        check_verifiable(model)
    real = {"a": np.ones((4, 3), np.float32), "b": np.ones((3, 4), np.float32), "c": np.zeros((1, 7), np.int32)}
    assert check_verifiable(model, [real])[2].symbols == (None, "seq")
    feed = random_batches(model, [real], n_random=1, batch=2)[0]
    assert {k: v.shape for k, v in feed.items()} == {"a": (2, 3), "b": (3, 2), "c": (1, 7)}
    assert compare(model, model, [real], batch=2).passed
    # Or the size is given by name, for random feeds without any real one.
    assert check_verifiable(model, sizes={"seq": 5})[2].symbols == (None, "seq")
    feed = random_batches(model, n_random=1, batch=3, sizes={"seq": 5})[0]
    assert {k: v.shape for k, v in feed.items()} == {"a": (3, 3), "b": (3, 3), "c": (1, 5)}


def test_compress_sizes_the_random_inputs_it_is_given():
    from sslcompress.errors import ConfigError
    from sslcompress.surgery.compress import compress

    w = np.ones((4, 6), np.float32)
    w[:, 3:] = 0  # three zero output columns: the cut deletes them
    model = _model([h.make_node("MatMul", ["x", "w"], ["m"], name="fc"), h.make_node("Relu", ["m"], ["r"]),
                    h.make_node("MatMul", ["r", "v"], ["y"], name="out")],
                   [_vi("x", T.FLOAT, ["batch", "seq", 4])], [_vi("y", T.FLOAT, ["batch", "seq", 2])],
                   [("w", w), ("v", np.ones((6, 2), np.float32))])
    with pytest.raises(UnsupportedModelError, match=r"compress\(sizes=\{name: size\}\)"):
        compress(model)
    result = compress(model, sizes={"seq": 7})
    assert result.verification.passed and result.report["totals"]["macs_after"] < result.report["totals"]["macs"]
    assert [d.dim_param for d in result.model.graph.input[0].type.tensor_type.shape.dim][:2] == ["batch", "seq"]
    for bad in ({"seq": 0}, {"seq": True}, ["seq"]):
        with pytest.raises(ConfigError, match="sizes must map dimension names"):
            compress(model, sizes=bad)


FP16_W = (np.random.default_rng(1).standard_normal((16, 8)) / 4).astype(np.float16)
SCALE = np.float16(3.3)


def _fp16(scaled_weight: np.ndarray | None = None) -> onnx.ModelProto:
    """y = (x @ W) * 3.3 in float16, or x @ W' with the scale folded into W' (what surgery folds)."""
    io = [_vi("x", T.FLOAT16, ["batch", 16])], [_vi("y", T.FLOAT16, ["batch", 8])]
    if scaled_weight is None:
        return _model([h.make_node("MatMul", ["x", "W"], ["t"]), h.make_node("Mul", ["t", "c"], ["y"])], *io,
                      [("W", FP16_W), ("c", np.array(SCALE))])
    return _model([h.make_node("MatMul", ["x", "W"], ["y"])], *io, [("W", scaled_weight)])


def test_fp16_tolerance_passes_rounding_but_not_a_change():
    assert output_rtol(np.float32, 1e-4) == 1e-4 and output_rtol(np.float64, 1e-4) == 1e-4
    assert output_rtol(np.float16, 1e-4) == FP16_RTOL and output_rtol(np.int64, 1e-4) == 0.0
    ref = _fp16()
    assert random_batches(ref, n_random=1)[0]["x"].dtype == np.float16
    folded = (FP16_W.astype(np.float32) * np.float32(SCALE)).astype(np.float16)
    rounding = compare(ref, _fp16(folded), n_random=8)
    # Rounding of fp16 alone, beyond what float32 would allow, within the float16 tolerance.
    assert rounding.passed and 1e-4 < rounding.rel < FP16_RTOL and rounding.rtol == FP16_RTOL
    changed = folded.copy()
    changed[3, 2] += np.float16(0.25)
    real = compare(ref, _fp16(changed), n_random=8)
    assert not real.passed and real.rel > FP16_RTOL


def _masked(negate: bool = False) -> onnx.ModelProto:
    nodes = [h.make_node("Not", ["m"], ["keep"])] if negate else [h.make_node("Identity", ["m"], ["keep"])]
    return _model(nodes + [h.make_node("Where", ["keep", "x", "zero"], ["y"])],
                  [_vi("x", T.FLOAT, ["batch", 6]), _vi("m", T.BOOL, ["batch", 6])], [_vi("y", T.FLOAT, ["batch", 6])],
                  [("zero", np.array(0.0, np.float32))])


def test_bool_input():
    ref = _masked()
    masks = np.concatenate([f["m"].ravel() for f in random_batches(ref, n_random=4)])
    assert masks.dtype == np.bool_ and masks.any() and not masks.all()
    assert compare(ref, ref).passed
    assert not compare(ref, _masked(negate=True)).passed


def _ir3(bias: float = 0.0) -> onnx.ModelProto:
    """IR 3 lists every initializer as a graph input too; they are not inputs to feed."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    return _model([h.make_node("Gemm", ["x", "W", "b"], ["y"])],
                  [_vi("x", T.FLOAT, [2, 4]), _vi("W", T.FLOAT, [4, 3]), _vi("b", T.FLOAT, [3])], [_vi("y", T.FLOAT, [2, 3])],
                  [("W", w), ("b", np.full(3, bias, np.float32))], opset=8, ir=3)


def test_initializers_listed_as_inputs_are_not_inputs():
    ref = _ir3()
    assert [s.name for s in describe_inputs(ref)] == ["x"]
    assert [list(f) for f in random_batches(ref, n_random=2)] == [["x"], ["x"]]
    assert compare(ref, ref).passed
    assert not compare(ref, _ir3(bias=1.0)).passed


def _with_input(value: onnx.ValueInfoProto) -> onnx.ModelProto:
    graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "g", [_vi("x", T.FLOAT, [2]), value],
                         [_vi("y", T.FLOAT, [2])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("value, words", [
    (_vi("s", T.STRING, [2]), "Input 's' holds STRING elements"),
    (_vi("s", T.COMPLEX64, [2]), "Input 's' holds COMPLEX64 elements"),
    (_vi("s", T.BFLOAT16, [2]), "no bfloat16 array"),
    (h.make_tensor_sequence_value_info("s", T.FLOAT, None), "Input 's' is a sequence"),
    (h.make_value_info("s", h.make_optional_type_proto(h.make_tensor_type_proto(T.FLOAT, [2]))), "an optional"),
])
def test_unsupported_input_is_one_line(value, words):
    model = _with_input(value)
    for call in (lambda: describe_inputs(model), lambda: check_verifiable(model), lambda: compare(model, model)):
        with pytest.raises(UnsupportedModelError, match=words) as err:
            call()
        assert "\n" not in str(err.value) and str(err.value).endswith("cannot be verified.")


def test_unreadable_output_and_dynamic_image_are_refused_first():
    bf16_out = _model([h.make_node("Cast", ["x"], ["y"], to=T.BFLOAT16)], [_vi("x", T.FLOAT, [2])],
                      [_vi("y", T.BFLOAT16, [2])])
    with pytest.raises(UnsupportedModelError, match="Output 'y' has element type BFLOAT16"):
        check_verifiable(bf16_out)
    image = _model([h.make_node("Relu", ["x"], ["y"])], [_vi("x", T.FLOAT, ["N", 3, "H", "W"])],
                   [_vi("y", T.FLOAT, ["N", 3, "H", "W"])])
    with pytest.raises(UnsupportedModelError, match=r"'x' has a dynamic dimension 2 \('H'\).*--data SPEC"):
        check_verifiable(image)
    assert check_verifiable(image, [np.zeros((1, 3, 5, 6), np.float32)])[0].image_like
    with pytest.raises(DataError, match="shape 1x4x5x6"):
        check_verifiable(image, [np.zeros((1, 4, 5, 6), np.float32)])


# ------------------------------------------------------------------------ selections, up to ties

W46 = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
W46[:, 3] = W46[:, 2]  # scores 2 and 3 tie exactly
PICK = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32)
NO_BIAS = np.zeros(6, np.float32)
TIE = np.zeros(6, np.float32)
TIE[3] = 1e-6  # breaks the tie the other way, 1e-6 of scores about 3: float noise by the criterion


def _topk(bias=NO_BIAS, k: int = 6, largest: int = 1, pick=PICK) -> onnx.ModelProto:
    """TopK of x @ W + bias, its values and indices as graph outputs, and the rows of ``pick`` they select."""
    return _model(
        [h.make_node("MatMul", ["x", "W"], ["m"]), h.make_node("Add", ["m", "bias"], ["s"]),
         h.make_node("TopK", ["s", "k"], ["values", "indices"], axis=-1, largest=largest, name="topk"),
         h.make_node("Gather", ["pick", "indices"], ["picked"], axis=0, name="pick")],
        [_vi("x", T.FLOAT, ["batch", 4])],
        [_vi("values", T.FLOAT, ["batch", k]), _vi("indices", T.INT64, ["batch", k]),
         _vi("picked", T.FLOAT, ["batch", k, 3])],
        [("W", W46), ("bias", bias), ("k", np.array([k], np.int64)), ("pick", pick)])


def test_topk_tie_permutation_passes_and_a_wrong_selection_fails():
    ref, tied = _topk(), _topk(TIE)
    feeds = random_batches(ref, n_random=4)
    assert any(not np.array_equal(ort_runner(ref)(f)[1], ort_runner(tied)(f)[1]) for f in feeds)
    assert not _strict(ref, tied).passed  # positionally, the tied permutation is a difference
    ok = compare(ref, tied)
    assert ok.passed, ok
    # Picking the smallest instead: the scores agree, the selection does not.
    wrong = compare(ref, _topk(TIE, largest=0))
    assert not wrong.passed and "indices" in wrong.where
    # A change after the selection, on the candidate's own (tied) selection.
    moved = PICK.copy()
    moved[2, 0] += 1.0
    after = compare(ref, _topk(TIE, pick=moved))
    assert not after.passed and after.where == "output 'picked'"
    # Scores moved for real (not a tie) fail at the selection's input.
    assert not compare(ref, _topk(TIE * 1e5)).passed
    # Top 3: the tie may straddle the boundary; a different k fails.
    assert compare(_topk(k=3), _topk(TIE, k=3), n_random=16).passed
    assert not compare(_topk(k=3), _topk(TIE, k=2)).passed


def test_divergence_on_selections():
    ref = _topk()
    feeds = random_batches(ref, n_random=2)
    assert first_diverging_node(ref, _topk(TIE), feeds) is None
    moved = PICK.copy()
    moved[:, 0] += 1.0
    found = first_diverging_node(ref, _topk(TIE, pick=moved), feeds)
    assert found is not None and (found.node, found.op_type) == ("pick", "Gather")
    found = first_diverging_node(ref, _topk(TIE, largest=0), feeds)
    assert found is not None and found.node == "topk"


def _argmax(bias=NO_BIAS, op: str = "ArgMax") -> onnx.ModelProto:
    return _model([h.make_node("MatMul", ["x", "W"], ["m"]), h.make_node("Add", ["m", "bias"], ["s"]),
                   h.make_node("Abs", ["s"], ["a"]),  # |s|: columns 2 and 3 tie exactly
                   h.make_node(op, ["a"], ["best"], axis=1, keepdims=0, name="argmax")],
                  [_vi("x", T.FLOAT, ["batch", 4])], [_vi("best", T.INT64, ["batch"])],
                  [("W", W46), ("bias", bias)])


def test_argmax_ties():
    ref, tied = _argmax(), _argmax(TIE)
    assert not _strict(ref, tied, 16).passed
    assert compare(ref, tied, n_random=16).passed
    off = np.zeros(6, np.float32)
    off[0] = 3.0  # column 0 wins where it did not: different scores, a different selection
    assert not compare(ref, _argmax(off), n_random=16).passed
    assert not compare(ref, _argmax(op="ArgMin"), n_random=16).passed


# Boxes [y1, x1, y2, x2]: 0 and 1 overlap (IoU 0.82), 2 and 3 overlap, 4 and 5 overlap by 0.5 as
# corners but 0.92 read as centres (center_point_box=1), 6 stands alone.
BOXES = np.array([[[0, 0, 1, 1], [0, 0.1, 1, 1.1], [2, 2, 3, 3], [2, 2.1, 3, 3.1],
                   [10, 10, 11, 11], [10, 10, 11, 12], [20, 20, 21, 21]]], np.float32)
LABELS = np.arange(14, dtype=np.float32).reshape(7, 2)
MASK = np.array([0, 0, 1, 1, 1, 1, 1], np.float32).reshape(1, 1, 7)
BASE = np.array([9, 9, 0, 0, 0, 0, 0], np.float32).reshape(1, 1, 7)  # boxes 0 and 1 tie at 9


def _nms(base=BASE, center: int = 0, labels=LABELS, iou: float = 0.6) -> onnx.ModelProto:
    """NMS of scores x * MASK + base, its (batch, class, box) triples and each selected box's labels."""
    return _model(
        [h.make_node("Mul", ["x", "mask"], ["xm"]), h.make_node("Add", ["xm", "base"], ["scores"]),
         h.make_node("NonMaxSuppression", ["boxes", "scores", "max_out", "iou"], ["selected"],
                     center_point_box=center, name="nms"),
         h.make_node("Gather", ["selected", "two"], ["box"], axis=1, name="column"),
         h.make_node("Gather", ["labels", "box"], ["picked"], axis=0, name="pick")],
        [_vi("x", T.FLOAT, [1, 1, 7])], [_vi("selected", T.INT64, ["m", 3]), _vi("picked", T.FLOAT, ["m", 2])],
        [("boxes", BOXES), ("mask", MASK), ("base", base), ("max_out", np.array([10], np.int64)),
         ("iou", np.array([iou], np.float32)), ("two", np.array(2, np.int64)), ("labels", labels)])


def _bumped(box: int, by: float) -> np.ndarray:
    base = BASE.copy()
    base[0, 0, box] += by
    return base


def test_nms_triples_with_tied_scores():
    ref, tied = _nms(), _nms(_bumped(1, 1e-6))
    x = random_batches(ref, n_random=1)[0]
    mine, theirs = ort_runner(ref)(x)[0], ort_runner(tied)(x)[0]
    assert [0, 0, 0] in mine.tolist() and [0, 0, 1] in theirs.tolist()  # the tie went the other way
    assert not _strict(ref, tied).passed
    ok = compare(ref, tied)
    assert ok.passed, ok
    # Box 1 above box 0 for real: the scores differ beyond the criterion.
    assert not compare(ref, _nms(_bumped(1, 0.01))).passed
    # The same scores and boxes read as centres: boxes 4 and 5 now overlap, one is suppressed.
    centres = compare(ref, _nms(_bumped(1, 1e-6), center=1))
    assert not centres.passed and "NonMaxSuppression 'nms'" in centres.where
    # A different IoU threshold is a different input of the selection.
    assert not compare(ref, _nms(_bumped(1, 1e-6), iou=0.95)).passed
    # After the selection: box 1's labels changed; the candidate picks box 1, so it shows.
    labels = LABELS.copy()
    labels[1] += 1
    after = compare(ref, _nms(_bumped(1, 1e-6), labels=labels))
    assert not after.passed and after.where == "output 'picked'"
    found = first_diverging_node(ref, _nms(_bumped(1, 1e-6), labels=labels), [x])
    assert found is not None and found.node == "pick"
    assert first_diverging_node(ref, tied, [x]) is None
