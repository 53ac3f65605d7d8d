from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslcompress.data import DataSpec, ImageData, data_kinds, load_data
from sslcompress.errors import DataError

# ---------------------------------------------------------------- helpers


def indexed_data(n: int = 23, augment: str = "none", shape=(1, 4, 4)) -> ImageData:
    """Each training sample's label is its index, so batches can be traced back to samples."""
    gen = torch.Generator().manual_seed(7)
    return ImageData(
        name="indexed",
        x_train=torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8),
        y_train=torch.arange(n),
        x_test=torch.randint(0, 256, (5, *shape), generator=gen, dtype=torch.uint8),
        y_test=torch.arange(5),
        num_classes=max(n, 5),
        mean=(0.5,) * shape[0],
        std=(0.25,) * shape[0],
        augment=augment,
    )


def labels_seen(data: ImageData, **kwargs) -> list[int]:
    return [int(v) for _, y in data.batches("train", 4, **kwargs) for v in y]


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def mnist_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 20).astype(np.uint8),
        "x_test": rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 8).astype(np.uint8),
    }


def cifar_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x_train": rng.integers(0, 256, (15, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 15).astype(np.uint8),
        "x_test": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 6).astype(np.uint8),
    }


def same_data(a: ImageData, b: ImageData) -> None:
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.num_classes == b.num_classes
    assert a.mean == pytest.approx(b.mean) and a.std == pytest.approx(b.std)


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "text,kind,path",
    [
        ("digits", "digits", None),
        ("mnist:data/mnist.npz", "mnist", "data/mnist.npz"),
        ("cifar10:/abs/cifar", "cifar10", "/abs/cifar"),
        ("imagefolder:imgs", "imagefolder", "imgs"),
        ("npz:C:/x/y.npz", "npz", "C:/x/y.npz"),
        ("synthetic", "synthetic", None),
        ("synthetic:3x32x32:10", "synthetic", "3x32x32:10"),
        ("synthetic:1x28x28:2", "synthetic", "1x28x28:2"),
    ],
)
def test_spec_parse_round_trip(text: str, kind: str, path: str | None) -> None:
    spec = DataSpec.parse(text)
    assert (spec.kind, spec.path) == (kind, path)
    assert str(spec) == text
    assert DataSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    ["", "   ", "imagenet", "mnist", "mnist:", "cifar10", "npz", "imagefolder", "digits:foo",
     "synthetic:3x32:10", "synthetic:3x32x32", "synthetic:0x32x32:10", "synthetic:3x32x32:0", "synthetic:a"],
)
def test_bad_specs_raise(text: str) -> None:
    with pytest.raises(DataError):
        DataSpec.parse(text)


def test_mnist_without_path_says_how() -> None:
    with pytest.raises(DataError, match="mnist needs a path: mnist:PATH"):
        load_data("mnist")


def test_data_kinds_cover_all_kinds() -> None:
    assert set(data_kinds()) == {"digits", "mnist", "cifar10", "imagefolder", "npz", "synthetic"}
    assert all(isinstance(v, str) and v for v in data_kinds().values())


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_data("digits")


def test_digits_shapes_and_stats(digits: ImageData) -> None:
    assert digits.x_train.shape == (1437, 1, 28, 28)
    assert digits.x_test.shape == (360, 1, 28, 28)
    assert digits.x_train.dtype == torch.uint8 and digits.y_train.dtype == torch.int64
    assert digits.num_classes == 10 and digits.in_channels == 1 and digits.image_size == (28, 28)
    assert digits.augment == "none" and digits.name == "digits"
    assert set(digits.y_test.tolist()) == set(range(10))
    assert int(digits.x_train.max()) == 255
    assert 0.2 < digits.mean[0] < 0.4 and 0.25 < digits.std[0] < 0.45
    expected = digits.x_train.double() / 255
    assert digits.mean[0] == pytest.approx(float(expected.mean()), abs=1e-9)
    assert digits.std[0] == pytest.approx(float(expected.std(unbiased=False)), abs=1e-9)


def test_digits_deterministic_and_resizable(digits: ImageData) -> None:
    same_data(digits, load_data("digits"))
    small = load_data("digits", image_size=(8, 8))
    assert small.image_size == (8, 8)
    # At the native size the pixels are the 0..16 values scaled to 0..255.
    from sklearn.datasets import load_digits

    raw = np.round(load_digits().images * 255 / 16)
    assert set(np.unique(small.x_train.numpy())) <= set(np.unique(raw))


def test_digits_normalized_batches(digits: ImageData) -> None:
    xs = torch.cat([x for x, _ in digits.batches("train", 500)])
    assert xs.dtype == torch.float32 and xs.shape == (1437, 1, 28, 28)
    assert float(xs.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(xs.std()) == pytest.approx(1.0, abs=1e-3)


def test_limits_subset(digits: ImageData) -> None:
    small = load_data("digits", limit_train=100, limit_test=50, seed=3)
    assert small.x_train.shape[0] == 100 and small.x_test.shape[0] == 50
    assert small.mean == digits.mean  # normalization of the full training split
    again = digits.subset(100, 50, seed=3)
    same_data(small, again)
    other = digits.subset(100, 50, seed=4)
    assert not torch.equal(other.y_train, small.y_train)
    assert len(set(small.y_train.tolist())) == 10
    unchanged = digits.subset(None, 10_000)
    assert unchanged.x_test is digits.x_test
    with pytest.raises(DataError):
        digits.subset(0, None)


# ---------------------------------------------------------------- batches


def test_batches_cover_each_sample_once() -> None:
    data = indexed_data(23)
    seen = labels_seen(data)
    assert seen == list(range(23))
    shuffled = labels_seen(data, shuffle=True, seed=5, epoch=2)
    assert sorted(shuffled) == list(range(23)) and shuffled != seen


def test_batches_distributed_shards() -> None:
    data = indexed_data(23)
    full = labels_seen(data, shuffle=True, seed=1, epoch=0)
    r0 = labels_seen(data, shuffle=True, seed=1, epoch=0, rank=0, world_size=2)
    r1 = labels_seen(data, shuffle=True, seed=1, epoch=0, rank=1, world_size=2)
    assert len(r0) == len(r1) == 11
    assert not set(r0) & set(r1)
    assert set(r0) | set(r1) == set(full[:22])
    assert r0 == full[:22][0::2] and r1 == full[:22][1::2]
    batches0 = list(data.batches("train", 4, shuffle=True, rank=0, world_size=2))
    batches1 = list(data.batches("train", 4, shuffle=True, rank=1, world_size=2))
    assert len(batches0) == len(batches1) == 3


def test_batches_order_depends_on_seed_and_epoch() -> None:
    data = indexed_data(50)
    a = labels_seen(data, shuffle=True, seed=1, epoch=3)
    assert a == labels_seen(data, shuffle=True, seed=1, epoch=3)
    assert a != labels_seen(data, shuffle=True, seed=1, epoch=4)
    assert a != labels_seen(data, shuffle=True, seed=2, epoch=3)


def test_batch_values_are_normalized() -> None:
    data = indexed_data(10, shape=(3, 4, 5))
    x, y = next(data.batches("train", 4))
    assert x.shape == (4, 3, 4, 5) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (data.x_train[:4].float() / 255 - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1e-5)
    xt, yt = next(data.batches("test", 100))
    assert xt.shape == (5, 3, 4, 5) and yt.tolist() == list(range(5))


@pytest.mark.parametrize("n", [1, 7, 23, 24, 25])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_num_batches_matches_batches(n: int, world_size: int, drop_last: bool) -> None:
    data = indexed_data(n)
    for rank in range(world_size):
        got = list(data.batches("train", 4, rank=rank, world_size=world_size, drop_last=drop_last, shuffle=True))
        assert len(got) == data.num_batches("train", 4, world_size=world_size, drop_last=drop_last)
        if drop_last:
            assert all(len(y) == 4 for _, y in got)


def test_batches_reject_bad_arguments() -> None:
    data = indexed_data(8)
    with pytest.raises(DataError):
        data.batches("val", 4)
    with pytest.raises(DataError):
        data.batches("train", 0)
    with pytest.raises(DataError):
        data.batches("train", 4, rank=2, world_size=2)
    with pytest.raises(DataError):
        data.num_batches("train", 4, world_size=0)


def _is_crop_flip_of(aug: torch.Tensor, orig: torch.Tensor) -> bool:
    padded = F.pad(orig, (4, 4, 4, 4))
    h, w = orig.shape[1:]
    for img in (padded, padded.flip(2)):
        for dy in range(9):
            for dx in range(9):
                if torch.equal(img[:, dy : dy + h, dx : dx + w], aug):
                    return True
    return False


def test_crop_flip_augmentation() -> None:
    data = indexed_data(40, augment="crop_flip", shape=(3, 8, 8))
    plain = torch.cat([x for x, _ in data.batches("train", 16, seed=2)])
    aug = torch.cat([x for x, _ in data.batches("train", 16, seed=2, augment=True)])
    again = torch.cat([x for x, _ in data.batches("train", 16, seed=2, augment=True)])
    other = torch.cat([x for x, _ in data.batches("train", 16, seed=2, epoch=1, augment=True)])
    assert aug.shape == plain.shape and aug.dtype == torch.float32
    assert not torch.equal(aug, plain)
    assert torch.equal(aug, again)
    assert not torch.equal(aug, other)
    # Undo the normalization and check that each image is a padded crop (maybe flipped) of its original.
    pixels = torch.round((aug * 0.25 + 0.5) * 255).to(torch.uint8)
    for i in range(40):
        assert _is_crop_flip_of(pixels[i], data.x_train[i])
    # Shuffled: labels still identify samples.
    for x, y in data.batches("train", 16, shuffle=True, seed=9, augment=True):
        pixels = torch.round((x * 0.25 + 0.5) * 255).to(torch.uint8)
        for img, label in zip(pixels, y.tolist(), strict=True):
            assert _is_crop_flip_of(img, data.x_train[label])


def test_flip_augmentation_and_none() -> None:
    data = indexed_data(64, augment="flip", shape=(3, 5, 5))
    plain = torch.cat([x for x, _ in data.batches("train", 64)])
    aug = torch.cat([x for x, _ in data.batches("train", 64, augment=True)])
    flipped = [torch.equal(a, p.flip(2)) for a, p in zip(aug, plain, strict=True)]
    kept = [torch.equal(a, p) for a, p in zip(aug, plain, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)
    none = indexed_data(10)
    assert torch.equal(next(none.batches("train", 10, augment=True))[0], next(none.batches("train", 10))[0])


# ---------------------------------------------------------------- mnist


def test_mnist_npz_and_idx_agree(tmp_path: Path) -> None:
    arrays = mnist_arrays()
    np.savez_compressed(tmp_path / "mnist.npz", **arrays)
    raw = tmp_path / "folder" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", arrays["x_train"], compress=True)
    write_idx(raw / "train-labels-idx1-ubyte", arrays["y_train"])
    write_idx(raw / "t10k-images-idx3-ubyte", arrays["x_test"])
    write_idx(raw / "t10k-labels-idx1-ubyte", arrays["y_test"], compress=True)
    from_npz = load_data(f"mnist:{tmp_path / 'mnist.npz'}")
    from_idx = load_data(f"mnist:{tmp_path / 'folder'}")
    same_data(from_npz, from_idx)
    assert from_npz.x_train.shape == (20, 1, 28, 28) and from_npz.num_classes == 10
    assert torch.equal(from_npz.x_train[:, 0], torch.from_numpy(arrays["x_train"]))
    assert from_npz.augment == "none"
    assert from_npz.mean[0] == pytest.approx(arrays["x_train"].mean() / 255)


def test_mnist_idx_errors(tmp_path: Path) -> None:
    arrays = mnist_arrays()
    write_idx(tmp_path / "train-images-idx3-ubyte", arrays["x_train"])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_data(f"mnist:{tmp_path}")
    write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["y_train"])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", arrays["y_test"])
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 8, 28, 28) + b"\x00" * 10)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_data(f"mnist:{tmp_path}")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x12\x34\x08\x03")
    with pytest.raises(DataError, match="magic"):
        load_data(f"mnist:{tmp_path}")
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="no train-images"):
        load_data(f"mnist:{tmp_path / 'other'}")


def test_mnist_rejects_colour_and_bad_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", **cifar_arrays())
    with pytest.raises(DataError, match="channels"):
        load_data(f"mnist:{tmp_path / 'c.npz'}")
    arrays = mnist_arrays()
    arrays["y_test"] = arrays["y_test"].copy()
    arrays["y_test"][0] = 10
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(DataError, match="out of range"):
        load_data(f"mnist:{tmp_path / 'm.npz'}")


# ---------------------------------------------------------------- cifar10


class Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str and bytes as Python 2 BINSTRING opcodes with numpy.core names, like the real CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _binstring(self, data: bytes) -> None:
        head = b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))
        self.write(head + data)
        self.memoize(data)

    def save_global(self, obj, name=None) -> None:
        if getattr(obj, "__module__", "") == "numpy._core.multiarray":
            self.write(b"cnumpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[bytes] = lambda self, obj: self._binstring(obj)
    dispatch[str] = lambda self, obj: self._binstring(obj.encode("latin1"))


def _dumps(obj: object, protocol: int | str) -> bytes:
    if protocol == "py2":
        buffer = io.BytesIO()
        Py2StylePickler(buffer, protocol=2).dump(obj)
        return buffer.getvalue()
    return pickle.dumps(obj, protocol=protocol)


def _write_cifar_batches(folder: Path, arrays: dict[str, np.ndarray], protocol: int | str) -> None:
    folder.mkdir(parents=True)
    rows = arrays["x_train"].transpose(0, 3, 1, 2).reshape(-1, 3072)
    parts = np.array_split(np.arange(len(rows)), 5)
    for i, idx in enumerate(parts, start=1):
        batch = {b"data": rows[idx], b"labels": [int(v) for v in arrays["y_train"][idx]], b"batch_label": b"x"}
        (folder / f"data_batch_{i}").write_bytes(_dumps(batch, protocol))
    test = {b"data": arrays["x_test"].transpose(0, 3, 1, 2).reshape(-1, 3072), b"labels": arrays["y_test"].tolist()}
    (folder / "test_batch").write_bytes(_dumps(test, protocol))


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, "py2"])
def test_cifar_npz_and_batches_agree(tmp_path: Path, protocol: int | str) -> None:
    arrays = cifar_arrays()
    arrays["x_train"][0] = 0
    arrays["x_train"][0, 1, 2] = (200, 100, 50)  # row 1, column 2: R, G, B
    np.savez_compressed(tmp_path / "cifar.npz", **arrays)
    _write_cifar_batches(tmp_path / "root" / "cifar-10-batches-py", arrays, protocol)
    from_npz = load_data(f"cifar10:{tmp_path / 'cifar.npz'}")
    from_pickles = load_data(f"cifar10:{tmp_path / 'root'}")
    same_data(from_npz, from_pickles)
    x = from_npz.x_train
    assert x.shape == (15, 3, 32, 32) and from_npz.in_channels == 3 and from_npz.augment == "crop_flip"
    assert x[0, :, 1, 2].tolist() == [200, 100, 50]
    assert int(x[0].sum()) == 350
    assert torch.equal(from_pickles.y_train, torch.from_numpy(arrays["y_train"].astype(np.int64)))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_batches(folder, cifar_arrays(), pickle.DEFAULT_PROTOCOL)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match="test_batch"):
        load_data(f"cifar10:{tmp_path}")


def test_cifar_missing_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_batches(folder, cifar_arrays(), 2)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3.*not found"):
        load_data(f"cifar10:{tmp_path}")


# ---------------------------------------------------------------- generic npz


def test_npz_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    nchw = rng.integers(0, 256, (6, 3, 5, 7), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 4], dtype=np.int16)
    np.savez(tmp_path / "nchw.npz", x_train=nchw, y_train=labels, x_test=nchw[:2], y_test=labels[:2])
    np.savez(tmp_path / "nhwc.npz", x_train=nchw.transpose(0, 2, 3, 1), y_train=labels,
             x_test=nchw[:2].transpose(0, 2, 3, 1), y_test=labels[:2])
    a, b = load_data(f"npz:{tmp_path / 'nchw.npz'}"), load_data(f"npz:{tmp_path / 'nhwc.npz'}")
    same_data(a, b)
    assert a.x_train.shape == (6, 3, 5, 7) and a.num_classes == 5 and a.augment == "none"
    assert torch.equal(a.x_train, torch.from_numpy(nchw))
    gray = nchw[:, 0]
    np.savez(tmp_path / "nhw.npz", x_train=gray, y_train=labels.reshape(-1, 1), x_test=gray[:3], y_test=labels[:3])
    c = load_data(f"npz:{tmp_path / 'nhw.npz'}")
    assert c.x_train.shape == (6, 1, 5, 7) and torch.equal(c.x_train[:, 0], torch.from_numpy(gray))
    resized = load_data(f"npz:{tmp_path / 'nhw.npz'}", image_size=(10, 14))
    assert resized.image_size == (10, 14) and resized.x_train.dtype == torch.uint8


@pytest.mark.parametrize(
    "change,match",
    [
        ({"x_train": None}, "lacks the arrays x_train"),
        ({"x_train": np.zeros((4, 5), np.uint8)}, "expected"),
        ({"x_train": np.zeros((4, 5, 5, 2), np.uint8)}, "expected"),
        ({"x_test": np.zeros((2, 6, 6), np.uint8)}, "x_test"),
        ({"y_train": np.array([0, 1, 2], np.int64)}, "3 labels for 4 images"),
        ({"y_train": np.array([0, 1, -1, 0], np.int64)}, "negative"),
        ({"y_train": np.array([0.0, 1.0, 0.0, 1.0])}, "integer"),
        ({"x_train": np.zeros((0, 5, 5), np.uint8), "y_train": np.zeros(0, np.int64)}, "empty"),
        ({"x_train": np.full((4, 5, 5), 300, np.int32)}, "0..255"),
    ],
)
def test_npz_validation(tmp_path: Path, change: dict, match: str) -> None:
    arrays = {
        "x_train": np.zeros((4, 5, 5), np.uint8),
        "y_train": np.array([0, 1, 0, 1]),
        "x_test": np.zeros((2, 5, 5), np.uint8),
        "y_test": np.array([0, 1]),
    }
    arrays.update(change)
    np.savez(tmp_path / "d.npz", **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(DataError, match=match):
        load_data(f"npz:{tmp_path / 'd.npz'}")


def test_missing_and_unreadable_paths(tmp_path: Path) -> None:
    for kind in ("mnist", "cifar10", "npz", "imagefolder"):
        with pytest.raises(DataError, match="not found"):
            load_data(f"{kind}:{tmp_path / 'nope'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_data(f"npz:{tmp_path / 'junk.npz'}")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        load_data(f"npz:{tmp_path / 'single.npy'}")


# ---------------------------------------------------------------- imagefolder


def _png(path: Path, color: tuple[int, int, int], size=(12, 8)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


COLORS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "eel": (0, 255, 0)}


def test_imagefolder_train_val(tmp_path: Path) -> None:
    for name, color in COLORS.items():
        for i in range(3):
            _png(tmp_path / "train" / name / f"{i}.png", color)
        _png(tmp_path / "val" / name / "a.PNG", color)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    data = load_data(f"imagefolder:{tmp_path}", image_size=(6, 10))
    assert data.x_train.shape == (9, 3, 6, 10) and data.x_test.shape == (3, 3, 6, 10)
    assert data.num_classes == 3 and data.augment == "flip"
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and data.y_test.tolist() == [0, 1, 2]
    for label, color in enumerate(COLORS.values()):
        assert data.x_test[label, :, 3, 5].tolist() == list(color)


def test_imagefolder_default_size_and_crop(tmp_path: Path) -> None:
    from PIL import Image

    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 20, 10))  # a white middle third
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        img.save(tmp_path / split / "a" / "x.bmp")
    data = load_data(f"imagefolder:{tmp_path}", image_size=(10, 10))
    assert data.x_train.shape == (1, 3, 10, 10)
    assert int(data.x_train.min()) >= 200  # the centre crop is the white square
    default = load_data(f"imagefolder:{tmp_path}")
    assert default.image_size == (224, 224)


def test_imagefolder_flat_split(tmp_path: Path) -> None:
    for name, color in COLORS.items():
        for i in range(5):
            _png(tmp_path / name / f"{i}.jpg", color)
    data = load_data(f"imagefolder:{tmp_path}", image_size=(8, 8))
    assert data.x_train.shape[0] == 12 and data.x_test.shape[0] == 3
    assert sorted(data.y_test.tolist()) == [0, 1, 2]
    same_data(data, load_data(f"imagefolder:{tmp_path}", image_size=(8, 8)))


def test_imagefolder_errors(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "a" / "0.png", (1, 2, 3))
    with pytest.raises(DataError, match="val"):
        load_data(f"imagefolder:{tmp_path}", image_size=(4, 4))
    _png(tmp_path / "val" / "a" / "0.png", (1, 2, 3))
    (tmp_path / "val" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        load_data(f"imagefolder:{tmp_path}", image_size=(4, 4))
    (tmp_path / "val" / "a" / "broken.png").unlink()
    _png(tmp_path / "val" / "zebra" / "0.png", (1, 2, 3))
    with pytest.raises(DataError, match="zebra"):
        load_data(f"imagefolder:{tmp_path}", image_size=(4, 4))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class"):
        load_data(f"imagefolder:{empty}")


# ---------------------------------------------------------------- synthetic


def test_synthetic_shapes() -> None:
    default = load_data("synthetic")
    assert default.x_train.shape == (512, 3, 32, 32) and default.x_test.shape == (128, 3, 32, 32)
    assert default.num_classes == 10 and default.augment == "none"
    custom = load_data("synthetic:1x28x20:4")
    assert custom.x_train.shape[1:] == (1, 28, 20) and custom.num_classes == 4
    assert int(custom.y_train.max()) <= 3
    same_data(custom, load_data(DataSpec.parse("synthetic:1x28x20:4")))
    assert load_data("synthetic", image_size=(16, 16)).image_size == (16, 16)


def test_imagedata_validates() -> None:
    d = indexed_data(6, shape=(3, 4, 4))
    assert "ImageData(" in repr(d) and "tensor" not in repr(d)
    stats = ((0.5,) * 3, (0.2,) * 3)
    with pytest.raises(DataError, match="uint8"):
        ImageData("bad", d.x_train.float(), d.y_train, d.x_test, d.y_test, 6, *stats)
    with pytest.raises(DataError, match="labels"):
        ImageData("bad", d.x_train, d.y_train + 100, d.x_test, d.y_test, 6, *stats)
    with pytest.raises(DataError, match="augment"):
        ImageData("bad", d.x_train, d.y_train, d.x_test, d.y_test, 6, *stats, "zoom")
    with pytest.raises(DataError, match="one per channel"):
        ImageData("bad", d.x_train, d.y_train, d.x_test, d.y_test, 6, (0.5,), (0.2,))
