"""Per-layer GEMM study: the lowering, the contenders' products, imposed sparsity, result fields. No timing asserted."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslcompress.bench import layers as L
from sslcompress.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "paper_table4.py"


@pytest.mark.parametrize(
    "c,o,hw,k,stride,pad,dilation,groups",
    [
        (3, 8, (13, 11), 3, 1, 1, 1, 1),
        (3, 4, (23, 23), 11, 4, 2, 1, 1),  # AlexNet conv1-like
        (4, 6, (9, 10), (3, 2), (2, 1), (1, 0, 2, 1), 1, 2),  # asymmetric ONNX pads, grouped
        (2, 5, (12, 12), 3, 2, 0, 2, 1),  # dilated, no padding
        (4, 4, (7, 7), 3, 1, 1, 1, 4),  # depthwise
    ],
)
def test_lowered_gemm_equals_conv2d(one_thread, c, o, hw, k, stride, pad, dilation, groups):
    g = torch.Generator().manual_seed(0)
    kh, kw = L._pair(k)
    x = torch.randn(2, c, *hw, generator=g)
    w = torch.randn(o, c // groups, kh, kw, generator=g)
    b = torch.randn(o, generator=g)
    t, left, bot, r = L._pads(pad)
    want = F.conv2d(F.pad(x, (left, r, t, bot)), w, b, stride=stride, dilation=dilation, groups=groups)
    got = L.conv_as_gemm(x, w, b, stride, pad, dilation, groups)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # lower_convs gives the same GEMMs: weight rows of each group times that group's im2col matrix
    gemms = L.lower_convs([(f"conv{groups}", w.numpy(), hw, stride, pad, dilation, groups)], batch=2)
    assert len(gemms) == groups
    og, cg = o // groups, c // groups
    for i, gm in enumerate(gemms):
        xcol = L.im2col(x[:, i * cg:(i + 1) * cg], (kh, kw), stride, pad, dilation)
        assert (gm.M, gm.K, gm.N) == (og, xcol.shape[0], xcol.shape[1])
        y = torch.from_numpy(gm.weight) @ xcol
        ref = want[:, i * og:(i + 1) * og] - b[i * og:(i + 1) * og, None, None]
        torch.testing.assert_close(y.reshape(og, 2, *want.shape[2:]).transpose(0, 1), ref, rtol=1e-4, atol=1e-4)


def test_alexnet_shapes_match_torch_conv_output():
    for shapes in L.ALEXNET_SHAPES.values():
        for s in shapes:
            x = torch.empty(1, s.in_channels, *s.input_hw, device="meta")
            w = torch.empty(s.out_channels, s.in_channels // s.groups, *s.kernel, device="meta")
            y = F.conv2d(x, w, stride=s.stride, padding=s.pads[:2], groups=s.groups)
            assert tuple(y.shape[2:]) == s.output_hw
    assert [s.gemm_dims() for s in L.ALEXNET_SHAPES["torchvision"]] == [
        (64, 363, 3025), (192, 1600, 729), (384, 1728, 169), (256, 3456, 169), (256, 2304, 169)]
    assert [s.gemm_dims(2) for s in L.ALEXNET_SHAPES["caffe"]] == [
        (96, 363, 6050), (128, 1200, 1458), (384, 2304, 338), (192, 1728, 338), (128, 1728, 338)]


def _small_layers():
    rng = np.random.default_rng(1)
    w = L.random_weight(24, 40, rng)
    return [L.LayerGemm("unstructured", 24, 40, 30, L.magnitude_prune(w, 0.8)),
            L.LayerGemm("structured", 24, 40, 30, L.structured_prune(w, 0.25, 0.5)),
            L.LayerGemm("dense", 24, 40, 30, w)]


def test_contenders_compute_the_dense_product(one_thread):
    for layer in _small_layers():
        out = L.contender_products(layer, L.CONTENDERS if L.scipy_available() else (L.CSR, L.COMPACT))
        ref = out[L.DENSE]
        np.testing.assert_allclose(ref.numpy(), layer.weight @ torch.randn(
            layer.K, layer.N, generator=torch.Generator().manual_seed(0)).numpy(), rtol=1e-4, atol=1e-5)
        for c, y in out.items():
            assert y.shape == (layer.M, layer.N), c
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5, msg=c)


def test_imposed_sparsities_are_exact():
    for shapes in L.ALEXNET_SHAPES:
        l1, ssl = L.table4_layers(shapes, batch=1, seed=3)
        for a, b, row in zip(l1, ssl, L.TABLE4, strict=True):
            size = a.M * a.K
            assert size - a.nnz == math.floor(row.l1_sparsity * size + 0.5)
            assert abs(a.sparsity - row.l1_sparsity) <= 0.5 / size + 1e-12
            assert b.M - len(b.kept_rows) == math.floor(row.row_sparsity * b.M + 0.5)
            assert b.K - len(b.kept_cols) == math.floor(row.col_sparsity * b.K + 0.5)
            # what survives is dense: every kept row x kept column entry is nonzero
            assert b.nnz == len(b.kept_rows) * len(b.kept_cols)
            # l1 zeros are scattered: no whole row or column goes at these sparsities
            assert len(a.kept_rows) == a.M


def test_prune_helpers_validate_and_keep_input():
    w = np.ones((4, 5), np.float32)
    with pytest.raises(ConfigError):
        L.magnitude_prune(w, 1.5)
    p = L.structured_prune(w, 0.5, 0.4)
    assert w.all() and (p.any(axis=1).sum(), p.any(axis=0).sum()) == (2, 3)


def test_speedups_recompute_from_samples_and_json_round_trips(one_thread):
    calls = []
    timings = L.study(_small_layers(), L.available_contenders("cpu"), threads=1, repeat=4, warmup=1,
                      sample_time=1e-4, progress=lambda i, n, t: calls.append((i, n, t.name)))
    assert calls == [(1, 3, "unstructured"), (2, 3, "structured"), (3, 3, "dense")]
    for t in timings:
        dense = t.get(L.DENSE)
        assert t.timings[0].contender == L.DENSE and dense.speedup == 1.0
        for c in t.timings:
            assert len(c.samples_s) == 4 and c.inner >= 1 and all(s > 0 for s in c.samples_s)
            assert c.median_s == statistics.median(c.samples_s)
            assert c.q1_s <= c.median_s <= c.q3_s
            assert c.speedup == pytest.approx(statistics.median(dense.samples_s) / statistics.median(c.samples_s))
            assert c.paired_speedup == pytest.approx(
                statistics.median(d / s for d, s in zip(dense.samples_s, c.samples_s, strict=True)))
        back = L.LayerTiming.from_dict(json.loads(json.dumps(t.to_dict())))
        assert back == t
    s = timings[1]
    assert (s.zero_rows, s.zero_cols) == (6, 20)
    assert (s.get(L.COMPACT).M, s.get(L.COMPACT).K) == (18, 20)
    assert L.mean_speedup(timings, L.CSR) == pytest.approx(statistics.fmean(t.speedup(L.CSR) for t in timings))
    assert torch.get_num_threads() == 1  # restored to the fixture's setting


def test_study_rejects_bad_contenders():
    with pytest.raises(ConfigError, match="unknown contender"):
        L.study(_small_layers()[:1], ("dense", "coo"))


def test_table4_spec_reproduces_the_papers_figures():
    assert [r.layer for r in L.TABLE4] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert L.paper_mean("cpu_ssl") == pytest.approx(5.07)
    assert L.paper_mean("cpu_l1") == pytest.approx(3.028)
    assert L.paper_mean("gpu_ssl") == pytest.approx(3.078)
    assert L.paper_mean("gpu_l1") == pytest.approx(0.91)
    h = L.PAPER_HEADLINE
    assert round(L.paper_mean("cpu_ssl"), 1) == h["cpu_ssl"]
    assert round(L.paper_mean("gpu_ssl"), 1) == h["gpu_ssl"]
    assert round(L.paper_mean("cpu_ssl") / L.paper_mean("cpu_l1"), 1) == h["cpu_ssl_over_l1"]
    assert round(L.paper_mean("gpu_ssl") / L.paper_mean("gpu_l1"), 1) == h["gpu_ssl_over_l1"]


def test_cuda_request_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(L.CudaUnavailableError, match=r"torch\.cuda\.is_available\(\) is False"):
        L.study(_small_layers()[:1], device="cuda")
    with pytest.raises(L.CudaUnavailableError):
        L.resolve_device("cuda:0")


def _script(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_script_cuda_request_without_cuda_exits_2(tmp_path):
    p = _script("--device", "cuda", tmp_path=tmp_path)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and "torch.cuda.is_available() is False" in p.stderr
    assert not list(tmp_path.iterdir())


def test_script_quick_writes_json_and_markdown(tmp_path):
    p = _script("--quick", "--repeat", "1", "--sample-time", "0.0005", "--warmup", "0", tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "paper_table4_cpu.json").read_text())
    run = doc["runs"][0]
    assert run["threads"] == 1 and len(run["l1"]) == len(run["ssl"]) == 5
    assert run["summary"]["paper_ssl"] == pytest.approx(5.07)
    md = (tmp_path / "paper_table4_cpu.md").read_text()
    assert "| conv4 |" in md and "SSL / l1" in md
    assert sorted(f.name for f in tmp_path.iterdir()) == ["paper_table4_cpu.json", "paper_table4_cpu.md"]
