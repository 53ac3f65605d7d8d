"""Image data sets held in memory as uint8 tensors, with deterministic, shardable batches."""

from __future__ import annotations

from sslcompress.data.dataset import ImageData
from sslcompress.data.loader import data_kinds, load_data
from sslcompress.data.spec import DataSpec

__all__ = ["DataSpec", "ImageData", "data_kinds", "load_data"]
