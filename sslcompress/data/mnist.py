"""MNIST from an .npz or from the original IDX files (as torchvision stores them), parsed directly."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from sslcompress.data.arrays import Splits, check_data_bytes, existing_path, read_npz, splits_from_arrays
from sslcompress.errors import DataError

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08


def read_idx(spec: str, path: Path, ndim: int) -> np.ndarray:
    """One IDX file (optionally gzipped): magic 0x0000 08 NDIM, big-endian uint32 dims, then uint8 data.

    The dims are checked before the data is read: against the file's size for a plain file, against
    the decompressed-data limit for a .gz, which is then inflated no further than the dims need.
    """
    gz = path.suffix == ".gz"
    try:
        opener = gzip.open if gz else open
        with opener(path, "rb") as handle:
            head = handle.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise DataError(f"{spec}: {path} is not an IDX file (bad magic number).")
            if head[2] != _IDX_UBYTE:
                raise DataError(
                    f"{spec}: {path} stores type code 0x{head[2]:02x}; only unsigned bytes (0x08) are supported."
                )
            if head[3] != ndim:
                raise DataError(f"{spec}: {path} has {head[3]} dimensions; expected {ndim}.")
            raw_dims = handle.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{spec}: {path} is truncated inside its header.")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            expected = math.prod(dims)
            header = 4 + 4 * ndim
            if gz:
                check_data_bytes(spec, f"{path} (dimensions {dims})", expected)
            elif header + expected != path.stat().st_size:
                raise DataError(
                    f"{spec}: {path} holds {path.stat().st_size - header} data bytes but its dimensions "
                    f"{dims} need {expected}."
                )
            data = handle.read(expected + 1)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{spec}: cannot read IDX file {path} ({exc}).") from exc
    if len(data) != expected:
        held = f"more than {expected}" if len(data) > expected else str(len(data))
        raise DataError(f"{spec}: {path} holds {held} data bytes but its dimensions {dims} need {expected}.")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _idx_folder(spec: str, root: Path) -> Path:
    """The first of ROOT, ROOT/raw, ROOT/MNIST/raw that holds the training images."""
    first = IDX_FILES["x_train"]
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        if (folder / first).is_file() or (folder / f"{first}.gz").is_file():
            return folder
    raise DataError(
        f"{spec}: no {first}[.gz] in {root}, {root / 'raw'} or {root / 'MNIST' / 'raw'}; "
        "expected an .npz file or a folder of MNIST IDX files."
    )


def _idx_file(spec: str, folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{spec}: {folder / name}[.gz] not found.")


def load_mnist_splits(spec: str, path: str | None) -> Splits:
    """Grayscale 10-class splits from PATH (.npz file or IDX folder)."""
    root = existing_path(spec, path)
    if root.is_dir():
        folder = _idx_folder(spec, root)
        arrays = {
            key: read_idx(spec, _idx_file(spec, folder, name), 3 if key.startswith("x") else 1)
            for key, name in IDX_FILES.items()
        }
    else:
        arrays = read_npz(spec, root)
    return splits_from_arrays(spec, arrays, channels=1, num_classes=10, augment="none")
