"""Shared checks and conversions that turn arrays from any source into uint8 NCHW tensors."""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sslcompress.errors import DataError

SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
_RESIZE_CHUNK = 4096
MAX_DATA_BYTES_ENV = "SSLCOMPRESS_MAX_DATA_BYTES"
DEFAULT_MAX_DATA_BYTES = 8 * 2**30  # decompressed bytes one data set may expand to
MAX_CLASSES = 100_000  # a class count inferred from labels above this is refused


def max_data_bytes() -> int:
    """The limit on decompressed data: SSLCOMPRESS_MAX_DATA_BYTES if set, else DEFAULT_MAX_DATA_BYTES."""
    text = os.environ.get(MAX_DATA_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_DATA_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(f"{MAX_DATA_BYTES_ENV} must be a positive number of bytes, got {text!r}.")
    return value


def check_data_bytes(spec: str, what: str, nbytes: int) -> None:
    """Refuse data that would decompress to more than max_data_bytes(), before it is allocated."""
    limit = max_data_bytes()
    if nbytes > limit:
        raise DataError(
            f"{spec}: {what} would take {nbytes} bytes in memory, over the limit of {limit} "
            f"(raise it with {MAX_DATA_BYTES_ENV} if the data set really is that large)."
        )


@dataclass(frozen=True)
class Splits:
    """What a loader returns before normalization statistics are computed."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: str = "none"


def existing_path(spec: str, path: str | None) -> Path:
    """The spec's path, expanded, or a DataError that says it is missing."""
    if not path:
        raise DataError(f"{spec}: no path given.")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"{spec}: path {path} not found.")
    return resolved


def read_npz(spec: str, path: Path) -> dict[str, np.ndarray]:
    """The four split arrays of an .npz; allow_pickle=False so a data file cannot run code."""
    if not path.is_file():
        raise DataError(f"{spec}: {path} is not a file; expected an .npz archive.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{spec}: {path} is not a readable .npz archive ({exc}).") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{spec}: {path} holds a single array, not an .npz archive with {', '.join(SPLIT_KEYS)}.")
    with loaded as archive:
        _check_npz_sizes(spec, path, archive.zip)
        missing = [k for k in SPLIT_KEYS if k not in archive.files]
        if missing:
            raise DataError(
                f"{spec}: {path} lacks the arrays {', '.join(missing)}; expected {', '.join(SPLIT_KEYS)}, "
                f"found {', '.join(archive.files) or 'none'}."
            )
        try:
            return {k: archive[k] for k in SPLIT_KEYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{spec}: {path} has an unreadable array ({exc}).") from exc


def _check_npz_sizes(spec: str, path: Path, archive: zipfile.ZipFile) -> None:
    """Read each split's .npy header and refuse, before any array is allocated, one whose declared
    shape needs more bytes than its archive member holds, or a total over the decompressed limit."""
    total = 0
    for key in SPLIT_KEYS:
        try:
            info = archive.getinfo(f"{key}.npy")
        except KeyError:
            continue
        if info.compress_type == zipfile.ZIP_STORED and info.file_size > info.compress_size:
            raise DataError(f"{spec}: {path} member {key} claims {info.file_size} bytes but stores {info.compress_size}.")
        try:
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                header = member.tell() if member.seekable() else 0
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{spec}: {path} has an unreadable array ({exc}).") from exc
        if dtype.hasobject:
            raise DataError(f"{spec}: {path} array {key} holds Python objects; expected numeric arrays.")
        need = math.prod(int(d) for d in shape) * dtype.itemsize
        if need > info.file_size - header:
            raise DataError(
                f"{spec}: {path} array {key} declares shape {tuple(shape)} ({need} bytes) but its member "
                f"holds only {info.file_size - header} bytes."
            )
        total += need
    check_data_bytes(spec, f"{path}", total)


def to_uint8(spec: str, what: str, arr: np.ndarray) -> np.ndarray:
    """Pixels as uint8; other integer ranges 0..255 and floats in 0..1 are converted, the rest refused."""
    if arr.dtype == np.uint8:
        return arr
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high > 255:
            raise DataError(f"{spec}: {what} has pixel values {low}..{high}; expected uint8 0..255.")
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        low, high = float(arr.min()), float(arr.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255:
            raise DataError(f"{spec}: {what} has float pixel values {low}..{high}; expected 0..1 or 0..255.")
        scale = 255.0 if high <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    raise DataError(f"{spec}: {what} has dtype {arr.dtype}; expected uint8 images.")


def images_to_nchw(spec: str, what: str, arr: np.ndarray, channels: int | None = None) -> torch.Tensor:
    """(N,H,W), (N,H,W,C) with C in 1/3/4, or (N,C,H,W) with C in 1/3 -> contiguous uint8 NCHW."""
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{spec}: {what} is not an array.")
    arr = to_uint8(spec, what, arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    if arr.ndim == 3:
        tensor = torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(1)
    elif arr.ndim == 4 and arr.shape[3] in (1, 3, 4):
        tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    elif arr.ndim == 4 and arr.shape[1] in (1, 3):
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        raise DataError(
            f"{spec}: {what} has shape {arr.shape}; expected (N, H, W), (N, H, W, C) with C in 1/3/4, "
            "or (N, C, H, W) with C in 1/3."
        )
    if channels is not None and tensor.shape[1] != channels:
        raise DataError(f"{spec}: {what} has shape {arr.shape}, i.e. {tensor.shape[1]} channels; expected {channels}.")
    if tensor.shape[0] == 0:
        raise DataError(f"{spec}: {what} is empty.")
    if tensor.shape[2] == 0 or tensor.shape[3] == 0:
        raise DataError(f"{spec}: {what} has shape {arr.shape}, with a zero image size.")
    return tensor.contiguous()


def labels_to_int64(spec: str, what: str, arr: np.ndarray, count: int, num_classes: int | None = None) -> torch.Tensor:
    """Class indices as int64 (N,); (N, 1) columns are accepted since Keras stores labels that way."""
    arr = np.asarray(arr)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{spec}: {what} has shape {arr.shape}; expected ({count},) class indices.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{spec}: {what} has dtype {arr.dtype}; expected integer class indices.")
    if arr.shape[0] != count:
        raise DataError(f"{spec}: {what} has {arr.shape[0]} labels for {count} images.")
    if arr.size:
        low, high = int(arr.min()), int(arr.max())
        if low < 0:
            raise DataError(f"{spec}: {what} contains the negative label {low}; labels must be 0..K-1.")
        if num_classes is not None and high >= num_classes:
            raise DataError(f"{spec}: {what} contains label {high}, out of range for {num_classes} classes (0..{num_classes - 1}).")
    return torch.from_numpy(arr.astype(np.int64))


def splits_from_arrays(
    spec: str, arrays: dict[str, np.ndarray], channels: int | None, num_classes: int | None, augment: str
) -> Splits:
    """Validate four split arrays together; num_classes=None means 'max label + 1'."""
    x_train = images_to_nchw(spec, "x_train", arrays["x_train"], channels)
    x_test = images_to_nchw(spec, "x_test", arrays["x_test"], channels)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{spec}: x_train images are {tuple(x_train.shape[1:])} (C, H, W) but x_test images are "
            f"{tuple(x_test.shape[1:])}."
        )
    y_train = labels_to_int64(spec, "y_train", arrays["y_train"], x_train.shape[0], num_classes)
    y_test = labels_to_int64(spec, "y_test", arrays["y_test"], x_test.shape[0], num_classes)
    if num_classes is None:
        num_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
        if num_classes > MAX_CLASSES:
            raise DataError(
                f"{spec}: the largest label is {num_classes - 1}, i.e. {num_classes} classes, over the limit of "
                f"{MAX_CLASSES}; labels must be class indices 0..K-1."
            )
    return Splits(x_train, y_train, x_test, y_test, num_classes, augment)


def resize_float(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of float pixels in 0..255 to uint8, in chunks to bound memory."""
    if tuple(x.shape[2:]) == tuple(size):
        return x.round().clamp_(0, 255).to(torch.uint8)
    out = torch.empty((x.shape[0], x.shape[1], *size), dtype=torch.uint8)
    for start in range(0, x.shape[0], _RESIZE_CHUNK):
        chunk = x[start : start + _RESIZE_CHUNK].to(torch.float32)
        resized = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)
        out[start : start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def resize_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 NCHW images; a no-op when the size already matches."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return resize_float(x, size)
