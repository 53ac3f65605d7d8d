"""One magnitude rule for both unstructured variants: the k largest entries, ties to the earlier entry."""

from __future__ import annotations

import numpy as np
import torch

from sslcompress.bench.variants import keep_largest
from sslcompress.finetune.unstructured import magnitude_masks
from sslcompress.magnitude import largest_magnitude_mask


def test_ties_go_to_the_earlier_entry():
    w = np.array([[1.0, -2.0], [2.0, -1.0]], dtype=np.float32)
    assert largest_magnitude_mask(w, 2).tolist() == [[False, True], [True, False]]
    assert largest_magnitude_mask(w, 3).tolist() == [[True, True], [True, False]]  # 1.0 before -1.0
    np.testing.assert_array_equal(keep_largest(w, 3), [[1.0, -2.0], [2.0, 0.0]])


def test_the_bench_and_the_trained_baseline_keep_the_same_entries():
    gen = np.random.default_rng(0)
    w = np.round(gen.standard_normal((6, 4, 3, 3)), 1).astype(np.float32)  # rounding makes many ties
    w[w == 0] = 0.1  # no zero weights, so "kept" and "nonzero" are one
    conv = torch.nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
    for k in (0, 1, 17, 100, w.size):
        (mask,) = magnitude_masks(torch.nn.Sequential(conv), {"0.weight": k}).values()
        assert int(mask.sum()) == k
        np.testing.assert_array_equal(mask.numpy(), keep_largest(w, k) != 0)
