"""Data set specs: one short string names a data set on the command line and in run records."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sslcompress.errors import DataError

KIND_HELP: dict[str, str] = {
    "digits": "scikit-learn's bundled 8x8 handwritten digits, resized to 28x28 (1797 images, no download)",
    "mnist": "mnist:PATH - MNIST from an .npz (x_train, y_train, x_test, y_test) or an IDX folder",
    "cifar10": "cifar10:PATH - CIFAR-10 from an .npz (NHWC RGB) or a cifar-10-batches-py folder",
    "imagefolder": "imagefolder:PATH - PATH/train/<class>/*.jpg and PATH/val/<class>/..., or PATH/<class>/...",
    "npz": "npz:PATH - any .npz with x_train, y_train, x_test, y_test (NHW, NHWC or NCHW uint8)",
    "synthetic": "synthetic or synthetic:CxHxW:K - random images and labels, for speed measurements only",
}

_NEEDS_PATH = {
    "mnist": "mnist:../shared/data/mnist/mnist.npz",
    "cifar10": "cifar10:../shared/data/cifar10/cifar10_jpeg_q75.npz",
    "imagefolder": "imagefolder:data/my_images",
    "npz": "npz:data/my_arrays.npz",
}

_SYNTHETIC_RE = re.compile(r"^(\d+)x(\d+)x(\d+):(\d+)$")


def synthetic_shape(text: str | None) -> tuple[int, int, int, int]:
    """(C, H, W, K) of a synthetic spec's path; parsed early so a typo fails before any setup."""
    if text is None:
        return 3, 32, 32, 10
    match = _SYNTHETIC_RE.match(text.strip().lower())
    if match is None:
        raise DataError(f"synthetic spec 'synthetic:{text}' is malformed; expected synthetic:CxHxW:K, e.g. synthetic:3x32x32:10.")
    c, h, w, k = (int(v) for v in match.groups())
    if min(c, h, w, k) < 1:
        raise DataError(f"synthetic spec 'synthetic:{text}' has a zero size or class count; all of C, H, W, K must be >= 1.")
    return c, h, w, k


@dataclass(frozen=True)
class DataSpec:
    """Which data set to load: a kind and, for file-backed kinds, a path."""

    kind: str
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KIND_HELP:
            known = ", ".join(KIND_HELP)
            raise DataError(f"unknown data set kind {self.kind!r}; known kinds are {known}.")
        if self.kind in _NEEDS_PATH:
            if not self.path:
                raise DataError(
                    f"{self.kind} needs a path: {self.kind}:PATH, e.g. {_NEEDS_PATH[self.kind]}."
                )
        elif self.kind == "digits":
            if self.path is not None:
                raise DataError(f"digits takes no path, got 'digits:{self.path}'; use plain 'digits'.")
        elif self.kind == "synthetic" and self.path is not None:
            c, h, w, k = synthetic_shape(self.path)
            object.__setattr__(self, "path", f"{c}x{h}x{w}:{k}")

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        """Read 'kind' or 'kind:PATH'; only the first ':' separates, so paths may contain ':'."""
        if not isinstance(text, str):
            raise DataError(f"a data set spec must be a string, got {type(text).__name__}.")
        stripped = text.strip()
        if not stripped:
            raise DataError("the data set spec is empty; use e.g. 'digits' or 'mnist:PATH'.")
        kind, sep, path = stripped.partition(":")
        kind = kind.strip().lower()
        if sep and not path:
            raise DataError(f"data set spec {text!r} ends with ':' but names no path.")
        return cls(kind, path if sep else None)

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"
