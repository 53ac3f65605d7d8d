"""Magnitude selection: the one rule both unstructured variants use (the bench's untrained one on ONNX
initializers, the trained baseline on torch weights), so both keep the same entries of equal weights."""

from __future__ import annotations

import numpy as np


def largest_magnitude_mask(values: np.ndarray, k: int) -> np.ndarray:
    """A bool mask of `values`' shape keeping its `k` largest-magnitude entries.

    Ties go to the earlier entry in row-major order (a stable sort), so the mask is the same on every
    machine and whichever library the weights came from.
    """
    flat = np.abs(np.asarray(values, dtype=np.float64)).reshape(-1)
    keep = np.zeros(flat.size, dtype=bool)
    k = max(0, min(int(k), flat.size))
    if k > 0:
        keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(np.shape(values))


def keep_largest(weight: np.ndarray, k: int) -> np.ndarray:
    """A copy of `weight` with all but its `k` largest-magnitude entries set to zero (the same tie rule)."""
    w = np.array(weight, copy=True)
    w[~largest_magnitude_mask(w, k)] = 0
    return w
