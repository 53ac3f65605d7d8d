"""The paper's Table 4 (Wen et al. 2016): AlexNet's conv layers, their l1 and SSL sparsities and speed-ups.

The specification only; `sslcompress.bench.paper` runs the study on it. Imports only the standard
library, numpy and torch (see `sslcompress.bench.gemm`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from sslcompress.bench.gemm import ConvShape, LayerGemm, magnitude_prune, random_weight, structured_prune
from sslcompress.errors import ConfigError


# ---------------------------------------------------------------- the paper's Table 4
@dataclass(frozen=True)
class PaperRow:
    """One AlexNet conv layer in Wen et al. 2016, Table 4 (speed-ups of that layer's GEMM)."""

    layer: str
    l1_sparsity: float
    col_sparsity: float
    row_sparsity: float
    cpu_l1: float
    cpu_ssl: float
    gpu_l1: float
    gpu_ssl: float


TABLE4 = (
    PaperRow("conv1", 0.676, 0.000, 0.094, 0.80, 1.05, 0.25, 1.00),
    PaperRow("conv2", 0.924, 0.632, 0.129, 2.91, 3.37, 0.52, 2.37),
    PaperRow("conv3", 0.972, 0.769, 0.406, 4.84, 6.27, 1.38, 4.94),
    PaperRow("conv4", 0.966, 0.847, 0.469, 3.83, 9.73, 1.04, 4.03),
    PaperRow("conv5", 0.943, 0.807, 0.000, 2.76, 4.93, 1.36, 3.05),
)
# The abstract's rounded claims: SSL averages 5.1x (CPU) and 3.1x (GPU); about 1.7x / 3.4x over l1.
PAPER_HEADLINE = {"cpu_ssl": 5.1, "gpu_ssl": 3.1, "cpu_ssl_over_l1": 1.7, "gpu_ssl_over_l1": 3.4}

# torchvision's AlexNet (224x224, no groups: each layer is one GEMM; the layout this package's models and
# ONNX exports use) and Caffe's bvlc_alexnet (227x227, conv2/4/5 in 2 groups), which the paper timed.
ALEXNET_SHAPES: dict[str, tuple[ConvShape, ...]] = {
    "torchvision": (
        ConvShape.of("conv1", 64, 3, 11, 224, stride=4, pad=2),
        ConvShape.of("conv2", 192, 64, 5, 27, pad=2),
        ConvShape.of("conv3", 384, 192, 3, 13, pad=1),
        ConvShape.of("conv4", 256, 384, 3, 13, pad=1),
        ConvShape.of("conv5", 256, 256, 3, 13, pad=1),
    ),
    "caffe": (
        ConvShape.of("conv1", 96, 3, 11, 227, stride=4),
        ConvShape.of("conv2", 256, 96, 5, 27, pad=2, groups=2),
        ConvShape.of("conv3", 384, 256, 3, 13, pad=1),
        ConvShape.of("conv4", 384, 384, 3, 13, pad=1, groups=2),
        ConvShape.of("conv5", 256, 384, 3, 13, pad=1, groups=2),
    ),
}


def paper_mean(column: str) -> float:
    """Arithmetic mean over conv1..conv5 of a Table 4 column (cpu_l1, cpu_ssl, gpu_l1, gpu_ssl)."""
    return statistics.fmean(getattr(row, column) for row in TABLE4)


def table4_layers(shapes: str = "torchvision", batch: int = 1, seed: int = 0
                  ) -> tuple[list[LayerGemm], list[LayerGemm]]:
    """(l1 layers, SSL layers): AlexNet's conv GEMMs with Table 4's sparsities imposed on one random weight.

    l1 zeros are placed by magnitude on random weights (so at random places); SSL zeros whole rows and
    columns. For a grouped (Caffe) layer, one group's GEMM stands for the layer: all groups have its shape.
    """
    if shapes not in ALEXNET_SHAPES:
        raise ConfigError(f"unknown AlexNet shapes {shapes!r}; choose from {sorted(ALEXNET_SHAPES)}")
    if batch < 1:
        raise ConfigError(f"batch must be at least 1, got {batch}")
    rng = np.random.default_rng(seed)
    l1, ssl = [], []
    for shape, row in zip(ALEXNET_SHAPES[shapes], TABLE4, strict=True):
        m, k, n = shape.gemm_dims(batch)
        w = random_weight(m, k, rng)
        l1.append(LayerGemm(row.layer, m, k, n, magnitude_prune(w, row.l1_sparsity)))
        ssl.append(LayerGemm(row.layer, m, k, n, structured_prune(w, row.row_sparsity, row.col_sparsity)))
    return l1, ssl
