"""Folders of image files, one subfolder per class, decoded once with Pillow into memory."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sslcompress.data.arrays import Splits, existing_path
from sslcompress.errors import DataError

DEFAULT_SIZE = (224, 224)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS
    )


def decode_image(spec: str, path: Path, size: tuple[int, int]) -> np.ndarray:
    """RGB HWC uint8: shorter side scaled to cover size, then a center crop, as for ImageNet evaluation."""
    from PIL import Image, UnidentifiedImageError

    height, width = size
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DataError(f"{spec}: cannot read image {path} ({exc}).") from exc
    scale = max(width / rgb.width, height / rgb.height)
    new_w, new_h = max(width, round(rgb.width * scale)), max(height, round(rgb.height * scale))
    if (new_w, new_h) != rgb.size:
        rgb = rgb.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return np.asarray(rgb.crop((left, top, left + width, top + height)), dtype=np.uint8)


def _decode_all(spec: str, files: list[Path], size: tuple[int, int]) -> torch.Tensor:
    """Decode in threads (Pillow releases the GIL while decoding); the order stays that of files."""
    out = np.empty((len(files), size[0], size[1], 3), dtype=np.uint8)
    workers = max(1, min(8, os.cpu_count() or 1, len(files)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, image in enumerate(pool.map(lambda p: decode_image(spec, p, size), files)):
            out[i] = image
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _listing(spec: str, folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    index = {name: i for i, name in enumerate(classes)}
    for class_dir in _class_dirs(folder):
        if class_dir.name not in index:
            raise DataError(f"{spec}: class folder {class_dir} has no counterpart in the training folder.")
        found = _image_files(class_dir)
        files.extend(found)
        labels.extend([index[class_dir.name]] * len(found))
    return files, labels


def _flat_split(spec: str, root: Path, classes: list[str]) -> tuple[list[Path], list[int], list[Path], list[int]]:
    """A fixed per-class 80/20 split, so the same folder always yields the same test set."""
    train_files: list[Path] = []
    train_labels: list[int] = []
    test_files: list[Path] = []
    test_labels: list[int] = []
    for label, name in enumerate(classes):
        found = _image_files(root / name)
        n_test = max(1, round(len(found) * TEST_FRACTION)) if len(found) >= 2 else 0
        order = np.random.default_rng([SPLIT_SEED, label]).permutation(len(found))
        test_set = {int(i) for i in order[:n_test]}
        for i, path in enumerate(found):
            (test_files if i in test_set else train_files).append(path)
            (test_labels if i in test_set else train_labels).append(label)
    return train_files, train_labels, test_files, test_labels


def load_imagefolder_splits(spec: str, path: str | None, image_size: tuple[int, int] | None = None) -> Splits:
    """PATH/train + PATH/val (or PATH/test), or PATH/<class> split 80/20; classes are sorted folder names."""
    root = existing_path(spec, path)
    if not root.is_dir():
        raise DataError(f"{spec}: {root} is not a folder; expected PATH/train/<class>/... or PATH/<class>/....")
    size = tuple(image_size or DEFAULT_SIZE)
    train_dir = root / "train"
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if train_dir.is_dir() or test_dir is not None:
        if not train_dir.is_dir() or test_dir is None:
            raise DataError(f"{spec}: {root} needs both train/ and val/ (or test/) folders, or neither.")
        classes = [p.name for p in _class_dirs(train_dir)]
        if not classes:
            raise DataError(f"{spec}: {train_dir} has no class subfolders.")
        train_files, train_labels = _listing(spec, train_dir, classes)
        test_files, test_labels = _listing(spec, test_dir, classes)
    else:
        classes = [p.name for p in _class_dirs(root)]
        if not classes:
            raise DataError(f"{spec}: {root} has no class subfolders.")
        train_files, train_labels, test_files, test_labels = _flat_split(spec, root, classes)
    if not train_files or not test_files:
        which = "training" if not train_files else "test"
        raise DataError(f"{spec}: found no {which} images ({', '.join(EXTENSIONS)}) under {root}.")
    return Splits(
        _decode_all(spec, train_files, size),
        torch.tensor(train_labels, dtype=torch.int64),
        _decode_all(spec, test_files, size),
        torch.tensor(test_labels, dtype=torch.int64),
        len(classes),
        "flip",
    )
