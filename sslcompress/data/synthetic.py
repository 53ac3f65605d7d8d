"""Random images and labels: a stand-in with a chosen shape for measuring speed, never accuracy."""

from __future__ import annotations

import torch

from sslcompress.data.arrays import Splits
from sslcompress.data.dataset import generator
from sslcompress.data.spec import synthetic_shape

TRAIN_SIZE = 512
TEST_SIZE = 128
SEED = 0


def load_synthetic_splits(shape_text: str | None) -> Splits:
    """Fixed-seed uint8 noise of shape CxHxW with K random labels, identical on every call."""
    c, h, w, k = synthetic_shape(shape_text)
    gen = generator(SEED, c, h, w, k)
    x_train = torch.randint(0, 256, (TRAIN_SIZE, c, h, w), generator=gen, dtype=torch.uint8)
    y_train = torch.randint(0, k, (TRAIN_SIZE,), generator=gen, dtype=torch.int64)
    x_test = torch.randint(0, 256, (TEST_SIZE, c, h, w), generator=gen, dtype=torch.uint8)
    y_test = torch.randint(0, k, (TEST_SIZE,), generator=gen, dtype=torch.int64)
    return Splits(x_train, y_train, x_test, y_test, k)
