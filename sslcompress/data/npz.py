"""Any .npz with the four split arrays: the way to bring one's own small data set."""

from __future__ import annotations

from sslcompress.data.arrays import Splits, existing_path, read_npz, splits_from_arrays


def load_npz_splits(spec: str, path: str | None) -> Splits:
    """Images in NHW, NHWC or NCHW layout; the class count is the largest label plus one."""
    arrays = read_npz(spec, existing_path(spec, path))
    return splits_from_arrays(spec, arrays, channels=None, num_classes=None, augment="none")
