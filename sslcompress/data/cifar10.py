"""CIFAR-10 from an NHWC .npz or from torchvision's cifar-10-batches-py pickles."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from sslcompress.data.arrays import Splits, check_data_bytes, existing_path, read_npz, splits_from_arrays
from sslcompress.errors import DataError

BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
_ROW = 3 * 32 * 32


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The few callables that pickled numpy arrays refer to; nothing else may be loaded."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,
    }
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR format is a pickle; this unpickler builds only numpy arrays, so a file cannot run code.

    Arrays come from bytes in the file, except that `_reconstruct(ndarray, shape, dtype)` allocates the shape it
    is given before any data arrives: a shape larger than the file itself is refused, so a small file cannot ask
    for gigabytes.
    """

    allowed = _numpy_globals()

    def __init__(self, handle, *, max_bytes: int, **kw: Any) -> None:
        super().__init__(handle, **kw)
        self.max_bytes = max_bytes

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None
        if name == "_reconstruct":
            return self._bounded_reconstruct(found)
        return found

    def _bounded_reconstruct(self, reconstruct: Any) -> Any:
        def build(subtype: Any, shape: Any, dtype: Any) -> Any:
            dims = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
            if not all(isinstance(d, int) and d >= 0 for d in dims):
                raise pickle.UnpicklingError(f"an array shape {shape!r} that is not sizes")
            nbytes = int(np.prod(dims, dtype=object)) * np.dtype(dtype).itemsize
            if nbytes > self.max_bytes:
                raise pickle.UnpicklingError(f"an array of {nbytes} bytes declared in a file of {self.max_bytes}")
            return reconstruct(subtype, shape, dtype)

        return build


def _get(batch: dict[Any, Any], key: str) -> Any:
    """Python 2 pickles have bytes keys, Python 3 ones str keys."""
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def read_batch(spec: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch: data rows of 3072 bytes (R plane, G plane, B plane) and a label list."""
    if not path.is_file():
        raise DataError(f"{spec}: CIFAR-10 batch file {path} not found.")
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, max_bytes=path.stat().st_size, encoding="bytes").load()
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            pickle.UnpicklingError) as exc:
        raise DataError(f"{spec}: cannot unpickle CIFAR-10 batch {path} ({exc}).") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{spec}: {path} holds a {type(batch).__name__}; expected a dict with b'data' and b'labels'.")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        raise DataError(f"{spec}: {path} lacks b'data' or b'labels'.")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        raise DataError(f"{spec}: {path} data has shape {data.shape} and dtype {data.dtype}; expected (N, {_ROW}) uint8.")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(f"{spec}: {path} has {labels.size} labels for {data.shape[0]} images.")
    return data.reshape(-1, 3, 32, 32), labels


def _batch_folder(spec: str, root: Path) -> Path:
    for folder in (root, root / BATCH_FOLDER):
        if (folder / TEST_BATCH).is_file() or (folder / TRAIN_BATCHES[0]).is_file():
            return folder
    raise DataError(
        f"{spec}: no {TRAIN_BATCHES[0]} or {TEST_BATCH} in {root} or {root / BATCH_FOLDER}; "
        "expected an .npz file or a cifar-10-batches-py folder."
    )


def load_cifar10_splits(spec: str, path: str | None) -> Splits:
    """RGB 10-class splits from PATH (.npz file or batches folder); augmented with pad-crop and flips."""
    root = existing_path(spec, path)
    if root.is_dir():
        folder = _batch_folder(spec, root)
        files = [folder / name for name in (*TRAIN_BATCHES, TEST_BATCH)]
        # Each batch is bounded by its file's size (read_batch); together they are bounded like any data set.
        check_data_bytes(spec, f"the CIFAR-10 batches in {folder}",
                         sum(f.stat().st_size for f in files if f.is_file()))
        train = [read_batch(spec, folder / name) for name in TRAIN_BATCHES]
        x_test, y_test = read_batch(spec, folder / TEST_BATCH)
        arrays = {
            "x_train": np.concatenate([x for x, _ in train]),
            "y_train": np.concatenate([y for _, y in train]),
            "x_test": x_test,
            "y_test": y_test,
        }
    else:
        arrays = read_npz(spec, root)
    return splits_from_arrays(spec, arrays, channels=3, num_classes=10, augment="crop_flip")
