"""scikit-learn's bundled handwritten digits: real images that need no download, for tests and demos."""

from __future__ import annotations

import numpy as np
import torch

from sslcompress.data.arrays import Splits, resize_float
from sslcompress.errors import DataError

DEFAULT_SIZE = (28, 28)
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits_splits(image_size: tuple[int, int] | None = None) -> Splits:
    """1797 8x8 digits scaled to 0..255 and resized (28x28 by default, so MNIST models fit)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DataError("digits needs scikit-learn, which is not installed.") from exc
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) * (255.0 / 16.0)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    x = resize_float(torch.from_numpy(images).unsqueeze(1), image_size or DEFAULT_SIZE)
    y = torch.from_numpy(labels)
    train = torch.from_numpy(np.asarray(train_idx, dtype=np.int64))
    test = torch.from_numpy(np.asarray(test_idx, dtype=np.int64))
    return Splits(x[train].contiguous(), y[train].contiguous(), x[test].contiguous(), y[test].contiguous(), 10)
