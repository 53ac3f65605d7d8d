"""In-memory image data sets: uint8 storage, normalized float batches, deterministic sharding."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from sslcompress.errors import DataError

AUGMENTS = ("none", "crop_flip", "flip")
CROP_PAD = 4


def derived_seed(*parts: int) -> int:
    """Mix several ints into one 63-bit seed so that (seed, epoch) pairs never share a stream."""
    entropy = [int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return int(state) & 0x7FFFFFFFFFFFFFFF


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from parts; every random choice here goes through one of these."""
    gen = torch.Generator()
    gen.manual_seed(derived_seed(*parts))
    return gen


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of x/255 from 256-bin histograms (no float copy of the data)."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means: list[float] = []
    stds: list[float] = []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = float((counts * levels).sum() / total)
        var = float((counts * (levels - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(math.sqrt(var) if var > 0 else 1.0)
    return tuple(means), tuple(stds)


def _check_size(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}.")


@dataclass(frozen=True, eq=False)
class ImageData:
    """A whole data set in memory as uint8 NCHW tensors, so epochs cost no decoding."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = self._split(split)
            if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
                raise DataError(f"{self.name}: x_{split} must be a uint8 tensor of shape (N, C, H, W).")
            if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
                raise DataError(f"{self.name}: y_{split} must be an int64 tensor of shape (N,).")
            if x.shape[0] != y.shape[0]:
                raise DataError(f"{self.name}: x_{split} has {x.shape[0]} images but y_{split} has {y.shape[0]} labels.")
            if x.shape[0] == 0:
                raise DataError(f"{self.name}: the {split} split is empty.")
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.num_classes:
                raise DataError(
                    f"{self.name}: {split} labels span {low}..{high}, outside 0..{self.num_classes - 1}."
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {tuple(self.x_train.shape[1:])} but test images are "
                f"{tuple(self.x_test.shape[1:])}."
            )
        channels = self.x_train.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise DataError(f"{self.name}: mean/std need {channels} values, one per channel.")
        if any(s <= 0 for s in self.std):
            raise DataError(f"{self.name}: std values must be positive, got {self.std}.")
        if self.augment not in AUGMENTS:
            raise DataError(f"{self.name}: augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}.")

    def __repr__(self) -> str:
        return (
            f"ImageData(name={self.name!r}, train={self.x_train.shape[0]}, test={self.x_test.shape[0]}, "
            f"shape={tuple(self.x_train.shape[1:])}, num_classes={self.num_classes}, augment={self.augment!r})"
        )

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        raise DataError(f"split must be 'train' or 'test', got {split!r}.")

    @staticmethod
    def _check_sharding(batch_size: int, rank: int, world_size: int) -> None:
        _check_size("batch_size", batch_size, 1)
        _check_size("world_size", world_size, 1)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise DataError(f"rank must be in 0..{world_size - 1}, got {rank!r}.")

    def num_batches(self, split: str, batch_size: int, *, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches each rank gets per epoch; equal on every rank, matching batches()."""
        self._check_sharding(batch_size, 0, world_size)
        per_rank = self._split(split)[0].shape[0] // world_size
        return per_rank // batch_size if drop_last else -(-per_rank // batch_size)

    def _order(self, n: int, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
        """This rank's sample indices: one shared permutation, truncated so all ranks get the same count."""
        if shuffle:
            order = torch.randperm(n, generator=generator(seed, epoch, 0))
        else:
            order = torch.arange(n)
        return order[: (n // world_size) * world_size][rank::world_size]

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = False,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (normalized float32 NCHW, int64 labels); the order depends only on (seed, epoch)."""
        x_all, y_all = self._split(split)
        self._check_sharding(batch_size, rank, world_size)
        return self._iterate(x_all, y_all, batch_size, shuffle, seed, epoch, rank, world_size, augment, drop_last)

    def _iterate(
        self,
        x_all: torch.Tensor,
        y_all: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        augment: bool,
        drop_last: bool,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order(x_all.shape[0], shuffle, seed, epoch, rank, world_size)
        mode = self.augment if augment else "none"
        aug_gen = generator(seed, epoch, rank, 1) if mode != "none" else None
        shape = (1, self.in_channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
        inv_std = (1.0 / torch.tensor(self.std, dtype=torch.float64)).to(torch.float32).view(shape)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            x = x_all[idx]
            if aug_gen is not None:
                x = augment_batch(x, mode, aug_gen)
            xf = x.to(torch.float32).mul_(1.0 / 255.0).sub_(mean).mul_(inv_std)
            yield xf, y_all[idx]

    def subset(self, limit_train: int | None, limit_test: int | None, seed: int = 0) -> ImageData:
        """A random subset for quick runs; mean/std stay those of the full training set,
        so a model trained on a subset is normalized like one trained on everything."""
        _check_size("limit_train", limit_train, 1)
        _check_size("limit_test", limit_test, 1)

        def take(x: torch.Tensor, y: torch.Tensor, limit: int | None, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
            if limit is None or limit >= x.shape[0]:
                return x, y
            idx = torch.randperm(x.shape[0], generator=generator(seed, stream))[:limit]
            return x[idx].contiguous(), y[idx].contiguous()

        x_train, y_train = take(self.x_train, self.y_train, limit_train, 0)
        x_test, y_test = take(self.x_test, self.y_test, limit_test, 1)
        return replace(self, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random flips (and pad-4 crops for 'crop_flip') for a whole uint8 batch at once."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    if mode == "flip":
        return torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    if mode != "crop_flip":
        raise DataError(f"unknown augmentation {mode!r}.")
    padded = F.pad(x, (CROP_PAD, CROP_PAD, CROP_PAD, CROP_PAD))
    dy = torch.randint(0, 2 * CROP_PAD + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * CROP_PAD + 1, (b,), generator=gen)
    rows = dy[:, None] + torch.arange(h)[None, :]
    cols_fwd = torch.arange(w)[None, :]
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - cols_fwd, cols_fwd)
    batch = torch.arange(b)[:, None, None]
    # Channels-last view so one gather picks every (row, col) pair per image: (B, H, W, C).
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
