"""A part of a split that the forward never reads: the count removes every channel of it, and the cut empties
that part of the Split (ONNX allows parts of size 0) rather than keep one channel, as it keeps one of any value
it would empty. Exact, checked in ORT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from counted_cut import exported
from onnx import numpy_helper
from torch import nn

from sslcompress.finetune.counting import count
from sslcompress.surgery.compress import compress

pytestmark = pytest.mark.usefixtures("one_thread")


class TokenSplit(nn.Module):
    """A Linear on tokens split in three along the features, the middle part unread."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 24), nn.Linear(8, 10)

    def forward(self, x):
        a, _, c = self.fc(x.flatten(2).transpose(1, 2)).split(8, -1)
        return self.out(F.relu(a) * c).mean(1)


class ChannelSplit(nn.Module):
    """A conv's channels split in three, the middle part unread."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(4, 10, 1)

    def forward(self, x):
        a, _, c = self.conv(x).split(4, 1)
        return self.head(a * c).mean((2, 3))


# The split sizes as an attribute (opset 11), as an input (17), or as num_outputs (the dynamo exporter).
EXPORTS = [{"opset": 11}, {"opset": 17}, {"exporter": "dynamo"}]


@pytest.mark.parametrize("export", EXPORTS, ids=["opset11", "opset17", "dynamo"])
@pytest.mark.parametrize("net, shape, layer", [(TokenSplit, (1, 8, 4, 4), "fc"), (ChannelSplit, (1, 3, 6, 6), "conv")])
def test_an_unread_part_goes_whole(net, shape, layer, export):
    torch.manual_seed(0)
    model = net().eval()
    counted = count(model, shape)
    assert counted.layer(layer).filters == ((16, 24) if net is TokenSplit else (8, 12))
    result = compress(exported(model, shape, **export))
    assert result.verification.passed
    assert result.report["totals"]["macs_after"] == counted.macs_after
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    attr = next((a for a in split.attribute if a.name == "split"), None)
    sizes = list(attr.ints) if attr is not None else \
        {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}[split.input[1]]
    assert np.array_equal(sizes, [8, 0, 8] if net is TokenSplit else [4, 0, 4])
