"""flops.Counter: dense MACs by hand, and what zero groups remove (with coupling and the cascade)."""

from __future__ import annotations

import pytest
import torch

from sslcompress.flops import Counter, count
from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


LENET_SHAPE = (1, 1, 28, 28)
R20_SHAPE = (1, 3, 32, 32)

# LeNet, dense, per sample
CONV1 = 20 * 1 * 25 * 24 * 24  # 288,000
CONV2 = 50 * 20 * 25 * 8 * 8  # 1,600,000
FC1 = 800 * 500  # 400,000
FC2 = 500 * 10  # 5,000
LENET_PARAMS = 20 * 26 + 50 * 501 + 500 * 801 + 10 * 501  # 431,080


def lenet():
    torch.manual_seed(0)
    m = build_model(ModelSpec("lenet5", 10, 1, (28, 28)))
    with torch.no_grad():  # init_weights zeroes conv biases; make them nonzero so zeros are deliberate
        m.conv1.bias.uniform_(0.1, 0.2)
        m.conv2.bias.uniform_(0.1, 0.2)
    return m


def resnet20():
    torch.manual_seed(0)
    return build_model(ModelSpec("resnet20", 10, 3, (32, 32)))


def test_lenet_dense():
    c = count(lenet(), LENET_SHAPE)
    assert CONV1 == 288_000 and CONV2 == 1_600_000 and FC1 == 400_000 and FC2 == 5_000
    assert [lay.name for lay in c.layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert [lay.macs for lay in c.layers] == [CONV1, CONV2, FC1, FC2]
    assert c.macs == 2_293_000
    assert c.macs_after == c.macs_gemm_after == c.macs
    assert c.params == c.params_after == LENET_PARAMS == 431_080
    assert c.blocks_removed == () and c.blocks_total == 0 and c.dead_channels == 0
    assert c.macs_fraction == 1.0
    conv2 = c.layer("conv2")
    assert conv2.filters == (50, 50) and conv2.channels == (20, 20)
    assert conv2.kernel == conv2.kernel_after == (5, 5)
    assert conv2.columns == (500, 500)
    assert not conv2.removed
    assert c.layer("fc1").channels == (800, 800)
    with pytest.raises(KeyError):
        c.layer("nope")


# stem 3->16 at 32x32; stage 1: six 16->16 3x3 convs at 32x32;
# stage 2: 16->32 (stride 2) + five 32->32 at 16x16 + a 1x1 16->32 projection;
# stage 3: 32->64 (stride 2) + five 64->64 at 8x8 + a 1x1 32->64 projection; fc 64->10.
STEM = 16 * 3 * 9 * 32 * 32
S1 = 6 * (16 * 16 * 9 * 32 * 32)
S2 = 32 * 16 * 9 * 16 * 16 + 5 * (32 * 32 * 9 * 16 * 16) + 32 * 16 * 1 * 16 * 16
S3 = 64 * 32 * 9 * 8 * 8 + 5 * (64 * 64 * 9 * 8 * 8) + 64 * 32 * 1 * 8 * 8
FC = 64 * 10
R20_MACS = STEM + S1 + S2 + S3 + FC


def test_resnet20_dense():
    m = resnet20()
    c = count(m, R20_SHAPE)
    assert R20_MACS == 40_813_184
    assert c.macs == c.macs_after == R20_MACS
    assert c.layer("conv1").macs == 442_368
    assert c.layer("layer2.0.downsample.0").macs == 131_072
    assert c.layer("layer3.2.conv2").macs == 64 * 64 * 9 * 64
    assert c.layer("fc").macs == 640
    assert len(c.layers) == 1 + 18 + 2 + 1
    assert c.blocks_total == 9 and c.blocks_removed == ()
    assert c.params == sum(p.numel() for p in m.parameters())


def test_resnet18_dense_small_input():
    m = build_model(ModelSpec("resnet18", 10, 3, (64, 64)))
    c = count(m, (1, 3, 64, 64))
    # stem 7x7/2 -> 32x32, max-pool/2 -> 16x16; stages at 16, 8, 4, 2
    stem = 64 * 3 * 49 * 32 * 32
    l1 = 4 * (64 * 64 * 9 * 16 * 16)
    l2 = 128 * 64 * 9 * 8 * 8 + 3 * (128 * 128 * 9 * 8 * 8) + 128 * 64 * 8 * 8
    l3 = 256 * 128 * 9 * 4 * 4 + 3 * (256 * 256 * 9 * 4 * 4) + 256 * 128 * 4 * 4
    l4 = 512 * 256 * 9 * 2 * 2 + 3 * (512 * 512 * 9 * 2 * 2) + 512 * 256 * 2 * 2
    assert c.macs == stem + l1 + l2 + l3 + l4 + 512 * 10
    assert c.blocks_total == 8


def test_lenet_zero_filters():
    m = lenet()
    counter = Counter(m, LENET_SHAPE)
    with torch.no_grad():
        m.conv1.weight[5:] = 0
        m.conv1.bias[5:] = 0
    c = counter.count()  # the counter reads the current weights
    conv1, conv2 = c.layer("conv1"), c.layer("conv2")
    assert conv1.filters == (5, 20) and conv1.channels == (1, 1)
    assert conv2.channels == (5, 20) and conv2.filters == (50, 50)
    assert conv1.macs_after == 5 * 1 * 25 * 24 * 24 == 72_000
    assert conv2.macs_after == 50 * 5 * 25 * 8 * 8 == 400_000
    assert c.macs_after == 72_000 + 400_000 + FC1 + FC2 == 877_000
    assert c.macs_gemm_after == 877_000
    assert c.params_after == 5 * 26 + (50 * 5 * 25 + 50) + 500 * 801 + 10 * 501
    assert c.dead_channels == 15
    # a zero filter with a nonzero bias is not a zero group
    with torch.no_grad():
        m.conv1.bias[7] = 0.5
    c = counter.count()
    assert c.layer("conv1").filters == (6, 20)
    assert c.macs_after == 6 * 25 * 576 + 50 * 6 * 25 * 64 + FC1 + FC2


def test_lenet_zero_channels_of_a_reader():
    m = lenet()
    with torch.no_grad():
        m.fc1.weight[:, 16 * 10:16 * 20] = 0  # conv2 channels 10..19 are read by nobody
    c = count(m, LENET_SHAPE)
    assert c.layer("fc1").channels == (800 - 160, 800)
    assert c.layer("conv2").filters == (40, 50)
    assert c.macs_after == CONV1 + 40 * 20 * 25 * 64 + 500 * 640 + FC2


def test_lenet_kernel_row_and_col():
    m = lenet()
    with torch.no_grad():
        m.conv2.weight[:, :, 0, :] = 0
        m.conv2.weight[:, :, :, 4] = 0
    c = count(m, LENET_SHAPE)
    conv2 = c.layer("conv2")
    assert conv2.kernel == (5, 5) and conv2.kernel_after == (4, 4)
    assert conv2.macs_after == 50 * 20 * 4 * 4 * 8 * 8 == 1_024_000
    assert conv2.columns == (20 * 16, 500)
    assert conv2.macs_gemm_after == 50 * 320 * 64
    assert c.macs_after == CONV1 + 1_024_000 + FC1 + FC2 == 1_717_000
    assert conv2.params_after == 50 * 20 * 16 + 50
    # an inner row does not shrink the extent
    m2 = lenet()
    with torch.no_grad():
        m2.conv2.weight[:, :, 2, :] = 0
    conv2 = count(m2, LENET_SHAPE).layer("conv2")
    assert conv2.kernel_after == (5, 5) and conv2.macs_after == CONV2
    assert conv2.columns == (400, 500) and conv2.macs_gemm_after == 50 * 400 * 64


def test_lenet_shape_columns_gemm():
    m = lenet()
    with torch.no_grad():
        m.conv2.weight[:5] = 0  # filters 0..4
        m.conv2.bias[:5] = 0
        m.conv1.weight[15:] = 0  # channels 15..19
        m.conv1.bias[15:] = 0
        for c, r, k in [(0, 1, 1), (3, 2, 2), (14, 4, 0), (16, 0, 0)]:  # (16, ...) is in a dead channel
            m.conv2.weight[:, c, r, k] = 0
    c = count(m, LENET_SHAPE)
    conv2 = c.layer("conv2")
    assert conv2.filters == (45, 50) and conv2.channels == (15, 20)
    kept_columns = 15 * 25 - 3
    assert conv2.columns == (kept_columns, 500)
    assert conv2.kernel_after == (5, 5)
    assert conv2.macs_after == 45 * 15 * 25 * 64
    assert conv2.macs_gemm_after == 45 * kept_columns * 8 * 8
    assert c.layer("fc1").channels == (45 * 16, 800)
    gemm = 15 * 25 * 576 + 45 * kept_columns * 64 + 500 * 720 + FC2
    assert c.macs_gemm_after == gemm
    assert c.macs_after == 15 * 25 * 576 + 45 * 15 * 25 * 64 + 500 * 720 + FC2


def test_lenet_cascade():
    m = lenet()
    with torch.no_grad():
        m.conv2.weight.zero_()
        m.conv2.bias.zero_()
    c = count(m, LENET_SHAPE)
    # fc1 still computes (its bias), so it still reads a tensor: the surgery never empties a value and keeps
    # conv2's last channel (an all-zero filter, at its full kernel), which keeps one conv1 channel in turn.
    assert c.layer("conv2").filters == (1, 50) and c.layer("conv2").channels == (1, 20)
    assert c.layer("conv2").kernel_after == (5, 5)
    assert c.layer("conv1").filters == (1, 20)
    assert c.layer("fc1").channels == (16, 800) and not c.layer("fc1").removed
    assert c.layer("fc2").macs_after == FC2
    assert c.macs_after == 25 * 576 + 25 * 64 + 500 * 16 + FC2
    assert c.dead_channels == 19 + 49
    # The surgery folds fc1's constant output further: the count bounds what the export keeps from above.
    result = compress(export_onnx(m, LENET_SHAPE).model)
    assert result.report["verification"]["passed"]
    assert result.report["totals"]["macs_after"] <= c.macs_after


def test_resnet20_depth_group_removes_block():
    m = resnet20()
    counter = Counter(m, R20_SHAPE)
    with torch.no_grad():
        for p in m.layer2[1].parameters():
            p.zero_()
    c = counter.count()
    assert c.blocks_removed == ("layer2.1",)
    assert c.macs_after == R20_MACS - 2 * (32 * 32 * 9 * 16 * 16)
    for lay in c.layers:
        if lay.name in ("layer2.1.conv1", "layer2.1.conv2"):
            assert lay.removed and lay.macs_after == 0
        else:
            assert not lay.removed and lay.macs_after == lay.macs, lay.name
    assert c.params_after == c.params - (2 * 32 * 32 * 9 + 4 * 32)


def test_resnet20_coupled_filter_not_removed_alone():
    m = resnet20()
    counter = Counter(m, R20_SHAPE)
    with torch.no_grad():  # channel 3 is zero in one summand of the stage-1 sum only
        m.layer1[0].conv2.weight[3] = 0
        m.layer1[0].bn2.weight[3] = 0
        m.layer1[0].bn2.bias[3] = 0
    c = counter.count()
    assert c.macs_after == R20_MACS and c.dead_channels == 0
    assert c.layer("layer1.0.conv2").filters == (16, 16)
    assert c.layer("layer1.1.conv1").channels == (16, 16)
    # zero in every summand: the stem and every block of the stage
    with torch.no_grad():
        m.conv1.weight[3] = 0
        m.bn1.weight[3] = 0
        m.bn1.bias[3] = 0
        for blk in m.layer1:
            blk.conv2.weight[3] = 0
            blk.bn2.weight[3] = 0
            blk.bn2.bias[3] = 0
    c = counter.count()
    assert c.dead_channels == 1
    for name in ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"):
        assert c.layer(name).filters == (15, 16), name
    for name in ("layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.downsample.0"):
        assert c.layer(name).channels == (15, 16), name
    saved = (3 * 9 * 1024  # stem filter
             + 3 * (16 * 9 * 1024)  # the last conv filter of each stage-1 block
             + 3 * (16 * 9 * 1024)  # the input channel of each stage-1 block's first conv
             + 32 * 9 * 256 + 32 * 256)  # the input channel of stage 2's first conv and projection
    assert c.macs_after == R20_MACS - saved
    assert c.params_after == c.params - (27 + 6 * 16 * 9 + 32 * 9 + 32) - 2 * 4  # 4 BNs x (scale, shift)
