"""Images as a model's input takes them: channels first, as every loader here gives them, or channels last."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sslcompress.errors import DataError


def _fits(have: Sequence[int], want: Sequence[int | None]) -> bool:
    return len(have) == len(want) and all(w is None or w == h for h, w in zip(have, want, strict=True))


def image_layout(images: Sequence[int], want: Sequence[int | None]) -> str | None:
    """How images of per-image shape `images` (C, H, W) fit a model input whose per-image shape is `want` (None
    for a free dimension): "first" as they are, "last" channels last (an input of (batch, H, W, C), as
    TensorFlow's exporters write it), None not at all. Channels first wins where both would fit."""
    have, want = tuple(int(d) for d in images), tuple(want)
    if _fits(have, want):
        return "first"
    if len(have) == 3 and _fits((have[1], have[2], have[0]), want):
        return "last"
    return None


def to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """A batch (N, C, H, W) in the layout image_layout found."""
    return x if layout == "first" else np.ascontiguousarray(np.moveaxis(x, 1, -1))


def in_input_layout(x: np.ndarray, shape: Sequence[int | None], data_name: str) -> np.ndarray:
    """Images (N, C, H, W) as the model's input (`shape`, batch first, None for a free dimension) takes them
    (image_layout); any other shape is one sentence (DataError)."""
    have, want = tuple(int(d) for d in x.shape[1:]), tuple(shape[1:])
    layout = image_layout(have, want)
    if layout is not None:
        return to_layout(x, layout)
    raise DataError(f"data set {data_name} has {'x'.join(map(str, have))} images but the model takes"
                    f" {'x'.join('?' if d is None else str(d) for d in want)} (CxHxW, or HxWxC channels last)")
