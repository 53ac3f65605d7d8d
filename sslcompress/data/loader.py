"""One entry point from a spec string to an ImageData, whatever the source format."""

from __future__ import annotations

from sslcompress.data.arrays import Splits, resize_uint8
from sslcompress.data.dataset import ImageData, channel_stats
from sslcompress.data.spec import KIND_HELP, DataSpec
from sslcompress.errors import DataError


def data_kinds() -> dict[str, str]:
    """Kind -> one-line description, for help texts."""
    return dict(KIND_HELP)


def _check_image_size(image_size: tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError) as exc:
        raise DataError(f"image_size must be a (height, width) pair, got {image_size!r}.") from exc
    if height < 1 or width < 1:
        raise DataError(f"image_size must be positive, got {image_size!r}.")
    return height, width


def _load_splits(spec: DataSpec, image_size: tuple[int, int] | None) -> Splits:
    name = str(spec)
    if spec.kind == "digits":
        from sslcompress.data.digits import load_digits_splits

        return load_digits_splits(image_size)
    if spec.kind == "imagefolder":
        from sslcompress.data.imagefolder import load_imagefolder_splits

        return load_imagefolder_splits(name, spec.path, image_size)
    if spec.kind == "mnist":
        from sslcompress.data.mnist import load_mnist_splits

        splits = load_mnist_splits(name, spec.path)
    elif spec.kind == "cifar10":
        from sslcompress.data.cifar10 import load_cifar10_splits

        splits = load_cifar10_splits(name, spec.path)
    elif spec.kind == "npz":
        from sslcompress.data.npz import load_npz_splits

        splits = load_npz_splits(name, spec.path)
    elif spec.kind == "synthetic":
        from sslcompress.data.synthetic import load_synthetic_splits

        splits = load_synthetic_splits(spec.path)
    else:
        raise DataError(f"no loader for data set kind {spec.kind!r}.")
    if image_size is None:
        return splits
    return Splits(
        resize_uint8(splits.x_train, image_size),
        splits.y_train,
        resize_uint8(splits.x_test, image_size),
        splits.y_test,
        splits.num_classes,
        splits.augment,
    )


def load_data(
    spec: str | DataSpec,
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> ImageData:
    """Load a data set into memory; normalization statistics come from the full training split."""
    parsed = spec if isinstance(spec, DataSpec) else DataSpec.parse(spec)
    splits = _load_splits(parsed, _check_image_size(image_size))
    mean, std = channel_stats(splits.x_train)
    data = ImageData(
        name=str(parsed),
        x_train=splits.x_train,
        y_train=splits.y_train,
        x_test=splits.x_test,
        y_test=splits.y_test,
        num_classes=splits.num_classes,
        mean=mean,
        std=std,
        augment=splits.augment,
    )
    if limit_train is None and limit_test is None:
        return data
    return data.subset(limit_train, limit_test, seed=seed)
