"""Op figures on the CPU are their compute nodes' time in ORT's profiler, not a session call's wall time."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest

from sslcompress.latency.kernel import (
    KernelTimes,
    compute_per_run,
    kernel_ms,
    net_ms,
    nodes_per_run,
    profiler_floor_ms,
    trimmed_mean,
)
from sslcompress.latency.ops import op_model
from sslcompress.latency.signature import Signature

CONV = Signature("conv", 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, (16, 16))


def _node(op: str, dur: float) -> dict:
    return {"cat": "Node", "name": f"{op}_0_kernel_time", "dur": dur, "args": {"op_name": op}}


def _run(dur: float) -> dict:
    return {"cat": "Session", "name": "model_run", "dur": dur, "args": {}}


def test_each_run_sums_its_compute_nodes_without_the_layout_reorders():
    events = [{"cat": "Session", "name": "session_initialization", "dur": 900},
              _node("ReorderInput", 5), _node("Conv", 40), _node("ReorderOutput", 7), _run(80),
              _node("Gemm", 3), _node("Add", 1), _run(20)]
    assert compute_per_run(events) == [40.0, 4.0]
    assert nodes_per_run(events) == [(40.0, 5.0, 7.0), (4.0, 0.0, 0.0)]  # the reorders apart, in and out


def test_trimmed_mean_drops_the_outer_quarters():
    assert trimmed_mean([1, 2, 3, 4, 5, 6, 7, 1000]) == pytest.approx(4.5)
    assert trimmed_mean([3.0]) == 3.0


def _wall_ms(model, x_shape, calls=200) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.zeros(x_shape, np.float32)}
    for _ in range(5):
        sess.run(None, feed)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls // 5):
            sess.run(None, feed)
        best = min(best, (time.perf_counter() - t0) / (calls // 5))
    return 1e3 * best


def test_a_blocked_conv_reads_below_its_session_call_and_grows_with_its_widths():
    model, x_shape = op_model(CONV, 32, 32, 1)
    narrow, narrow_shape = op_model(CONV, 8, 8, 1)
    wide_kernel = kernel_ms(model, x_shape, threads=1, seconds=0.05)
    narrow_kernel = kernel_ms(narrow, narrow_shape, threads=1, seconds=0.05)
    # The session call adds its own cost and the two reorders; the kernel alone is less (robust to load: the
    # best wall sample against a mean of kernel readings taken with it).
    assert 0 < wide_kernel < _wall_ms(model, x_shape) * 1.5
    # 16x the MACs: the kernel must show it, far beyond any fixed cost per call.
    assert wide_kernel > 2 * narrow_kernel


def test_the_table_times_cpu_ops_by_their_kernels(monkeypatch):
    from sslcompress.latency import profile
    from sslcompress.latency.key import current_key

    seen = []
    monkeypatch.setattr(profile, "kernel_parts", lambda *a, **k: seen.append(a) or KernelTimes(0.5, 0.0, 0.04))
    assert profile.time_op(CONV, 16, 16, current_key("cpu", 1, 1)) == 0.5
    assert seen and seen[0][1] == (1, 16, 16, 16)
    assert profile.time_op(CONV, 16, 16, current_key("cpu", 1, 1), floor=0.2) == pytest.approx(0.3)
    # the reorders beside it, each less the floor; none stays none
    assert profile.time_op_parts(CONV, 16, 16, current_key("cpu", 1, 1), floor=0.01) == pytest.approx((0.49, 0.0, 0.03))


def test_the_profilers_floor_is_taken_off_each_op_but_never_all_of_it():
    assert net_ms(0.05, 0.006) == pytest.approx(0.044)
    assert net_ms(0.005, 0.006) == pytest.approx(0.0005)  # a tenth of the reading, never nothing or less


def test_the_profilers_floor_is_a_few_microseconds_below_any_real_op():
    floor = profiler_floor_ms(threads=1, seconds=0.02)
    model, x_shape = op_model(CONV, 32, 32, 1)
    assert 0 < floor < kernel_ms(model, x_shape, threads=1, seconds=0.05)
    assert floor < 0.1  # microseconds, not a session call


def test_each_point_keeps_the_median_of_its_passes_over_the_grid(monkeypatch):
    """A point read slow in one pass (a neighbour's burst) is filed at the median of its readings."""
    from torch import nn

    from sslcompress.latency import profile
    from sslcompress.latency.key import current_key
    from sslcompress.latency.table import LatencyTable

    monkeypatch.setattr(profile, "PASSES", 3)
    shares = []
    passes_seen = {}  # pass by pass, every point reads 1.0, then 9.0 (one slow pass), then 2.0

    def fake_time_op(sig, cin, cout, key, rounds, floor, share=1.0):
        shares.append(share)
        n = passes_seen[(sig, cin, cout)] = passes_seen.get((sig, cin, cout), 0) + 1
        return [1.0, 9.0, 2.0][n - 1], [0.1, 0.9, 0.2][n - 1], [0.3, 0.1, 0.2][n - 1]

    curve_seen = {}

    def fake_time_reorder(hw, width, key, rounds, floor, share=1.0):
        n = curve_seen[(hw, width)] = curve_seen.get((hw, width), 0) + 1
        return [0.5, 5.0, 0.4][n - 1]

    monkeypatch.setattr(profile, "time_op_parts", fake_time_op)
    monkeypatch.setattr(profile, "time_reorder", fake_time_reorder)
    monkeypatch.setattr(profile, "profiler_floor_ms", lambda threads: 0.0)
    monkeypatch.setattr(profile, "time_sessions", lambda models, *a, **k: {n: 3.0 for n in models})
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    key = current_key("cpu", 1, 1)
    table = profile.profile_model(model, (1, 3, 8, 8), key, LatencyTable(key), step=8, rounds=3)
    values = [v for e in table.entries.values() for v in e.points.values()]
    assert values and set(values) == {2.0}
    # the reorders around each op, each its own median of the passes
    assert {r for e in table.entries.values() for r in e.reorders.values()} == {(0.2, 0.2)}
    if key.block > 1:  # a curve of the ReorderOutput per conv output size, the same way
        assert set(table.reorder_curves) == {"8x8"} and set(table.reorder_curves["8x8"].values()) == {0.5}
        assert sorted(table.reorder_curves["8x8"]) == list(range(1, key.block + 2))
    assert set(passes_seen.values()) == {3} and shares == pytest.approx([1 / 3] * len(shares))
