"""Sizes an input declares are checked before anything that large is allocated or read (issue 9, items 5-6)."""

from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sslcompress.data import load_data
from sslcompress.data.arrays import MAX_DATA_BYTES_ENV
from sslcompress.data.mnist import read_idx
from sslcompress.errors import DataError, UnsupportedModelError
from sslcompress.surgery.export import load_onnx
from sslcompress.surgery.inputs import check_verifiable


def _npy_header(shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _small_arrays(y_max: int = 1) -> dict[str, np.ndarray]:
    return {
        "x_train": np.zeros((4, 8, 8), np.uint8),
        "y_train": np.array([0, 1, 0, y_max], np.int64),
        "x_test": np.zeros((2, 8, 8), np.uint8),
        "y_test": np.array([0, 1], np.int64),
    }


def test_npz_header_declaring_huge_array_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.npz"
    arrays = _small_arrays()
    with zipfile.ZipFile(path, "w") as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr)
            data = buf.getvalue()
            if key == "x_train":
                data = _npy_header((1_000_000, 1000, 1000)) + b"\0" * 64
            zf.writestr(f"{key}.npy", data)
    with pytest.raises(DataError, match=r"declares shape \(1000000, 1000, 1000\)"):
        load_data(f"npz:{path}")


def test_npz_over_the_decompressed_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "small.npz"
    np.savez_compressed(path, **_small_arrays())
    monkeypatch.setenv(MAX_DATA_BYTES_ENV, "100")
    with pytest.raises(DataError, match=f"over the limit of 100 .*{MAX_DATA_BYTES_ENV}"):
        load_data(f"npz:{path}")
    monkeypatch.setenv(MAX_DATA_BYTES_ENV, "lots")
    with pytest.raises(DataError, match=f"{MAX_DATA_BYTES_ENV} must be a positive number"):
        load_data(f"npz:{path}")
    monkeypatch.delenv(MAX_DATA_BYTES_ENV)
    assert load_data(f"npz:{path}").num_classes == 2


def test_npz_label_of_a_billion_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels.npz"
    np.savez(path, **_small_arrays(y_max=10**9))
    with pytest.raises(DataError, match="1000000001 classes, over the limit"):
        load_data(f"npz:{path}")


def _idx(dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def test_gzip_idx_declaring_huge_dims_is_refused_before_inflating(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx((60000, 10000, 10000)) + b"\0" * 1000))
    with pytest.raises(DataError, match="over the limit"):
        read_idx("mnist", path, 3)


def test_gzip_bomb_is_inflated_no_further_than_its_dims(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx((2, 2, 2)) + bytes(20 * 2**20), compresslevel=9))
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match="more than 8 data bytes"):
        read_idx("mnist", path, 3)
    path.write_bytes(gzip.compress(_idx((2, 2, 2)) + bytes(range(8))))
    assert read_idx("mnist", path, 3).tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_random_inputs_for_a_huge_declared_input_are_refused() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 100000, 100000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 100000, 100000])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    with pytest.raises(UnsupportedModelError, match="over the limit of 268435456"):
        check_verifiable(model)


def _external_model(folder: Path, location: str, offset: int = 0, length: int | None = 16) -> Path:
    """A 4-float initializer W kept in LOCATION, added to the input."""
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        w.external_data.add(key=key, value=value)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "g", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _weights() -> bytes:
    return np.arange(4, dtype=np.float32).tobytes()


def test_external_data_inside_the_folder_loads(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(_weights())
    model = load_onnx(_external_model(tmp_path, "w.bin"))
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).tolist() == [0, 1, 2, 3]


def test_external_data_without_length_reads_only_what_the_dims_need(tmp_path: Path) -> None:
    with open(tmp_path / "w.bin", "wb") as handle:
        handle.write(_weights())
        handle.truncate(8 * 2**20)  # sparse: stands for a file far larger than the tensor
    model = load_onnx(_external_model(tmp_path, "w.bin", length=None))
    assert len(model.graph.initializer[0].raw_data) == 16


@pytest.mark.parametrize("location, match", [
    ("../outside.bin", "without '..'"),
    ("sub/../../outside.bin", "without '..'"),
    ("ABS", "relative path inside the model's folder"),
    ("missing.bin", "missing or not a file"),
    ("link.bin", "outside the model's folder"),
])
def test_external_data_locations_outside_or_missing_are_refused(tmp_path: Path, location: str, match: str) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(_weights())
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(outside, folder / "link.bin")
    if location == "ABS":
        location = str(outside)
    with pytest.raises(UnsupportedModelError, match=match):
        load_onnx(_external_model(folder, location))


def test_external_data_past_the_file_end_is_refused(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(_weights())
    with pytest.raises(UnsupportedModelError, match="claims bytes 8..24 .* holds only 16 bytes"):
        load_onnx(_external_model(tmp_path, "w.bin", offset=8, length=16))
    with pytest.raises(UnsupportedModelError, match="need 16"):
        load_onnx(_external_model(tmp_path, "w.bin", length=8))


class _HugeArray:
    """Pickles as numpy's own `_reconstruct(ndarray, shape, dtype)` call with a shape of 80 GB."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (10**10,), b"d")


def test_cifar_batch_declaring_a_huge_array_is_refused_unallocated(tmp_path: Path) -> None:
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    small = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(pickle.dumps(small, protocol=2))
    assert load_data(f"cifar10:{tmp_path}").num_classes == 10  # the small batches load
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _HugeArray(), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="data_batch_3.*bytes declared in a file of"):
        load_data(f"cifar10:{tmp_path}")


def test_cifar_batches_over_the_data_limit_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4}))
    monkeypatch.setenv(MAX_DATA_BYTES_ENV, "10000")
    with pytest.raises(DataError, match=MAX_DATA_BYTES_ENV):
        load_data(f"cifar10:{tmp_path}")
