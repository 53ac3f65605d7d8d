"""Top-1 accuracy of each variant on the test images of a data set, in ONNX Runtime (CPU)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import DataError

BATCH = 64  # images per run when the model's batch dimension is dynamic


@dataclass(frozen=True)
class TestImages:
    """Normalized test images (as in training) and their labels."""

    name: str
    x: np.ndarray  # (N, C, H, W) float32, or (N, H, W, C) for a channels-last model
    y: np.ndarray  # (N,) int64


def load_test_images(spec: str, shape: Sequence[int | None], *, limit: int, seed: int = 0) -> TestImages:
    """Up to `limit` test images of `spec` in the model's input layout; they must have its (C, H, W)."""
    from ..data import load_data
    from ..data.layout import in_input_layout

    if limit < 1:
        raise DataError(f"the number of test images must be positive, got {limit}")
    data = load_data(spec, limit_test=limit, seed=seed)
    xs, ys = zip(*data.batches("test", BATCH), strict=True)
    x = np.concatenate([b.numpy() for b in xs]).astype(np.float32, copy=False)
    y = np.concatenate([b.numpy() for b in ys]).astype(np.int64, copy=False)
    return TestImages(data.name, in_input_layout(x, shape, data.name), y)


def top1(sess, images: TestImages, static_batch: int | None = None) -> tuple[int, int]:
    """(correct, counted) over the images; a static batch B counts whole batches of B only."""
    name = sess.get_inputs()[0].name
    size = static_batch or BATCH
    n = len(images.x) - (len(images.x) % size if static_batch else 0)
    if n == 0:
        raise DataError(f"the model takes batches of exactly {static_batch} images, more than the"
                        f" {len(images.x)} test images loaded")
    from ..runtime.binding import as_input

    correct = 0
    for i in range(0, n, size):
        logits = sess.run(None, {name: as_input(sess, images.x[i:i + size])})[0]
        correct += int((np.asarray(logits).reshape(len(logits), -1).argmax(axis=1) == images.y[i:i + size]).sum())
    return correct, n


def common_images(images: TestImages, static_batches: Sequence[int | None]) -> TestImages:
    """The first images, as many as every static batch size divides, so each variant scores the same set."""
    import math

    sizes = [b for b in static_batches if b]
    step = math.lcm(*sizes) if sizes else 1
    n = len(images.x) - len(images.x) % step
    if n == 0:
        raise DataError(f"the models take batches of exactly {', '.join(map(str, sorted(set(sizes))))} images; the"
                        f" {len(images.x)} test images loaded are too few for one batch of each")
    return TestImages(images.name, images.x[:n], images.y[:n])
