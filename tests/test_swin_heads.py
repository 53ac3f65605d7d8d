"""Heads of windowed attention with a relative position bias per head (Swin): the bias table's column of a head
goes with the head, the shifted windows' mask (added per window in a 5-D view of the scores) treats every head
alike. Found in fx graphs and torch.export's, cut as counted by both exporters (the 5-D view is rewritten to the
kept heads), thinned exactly with the table sliced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from counted_cut import assert_cut_as_counted, assert_thinned_exactly, exported
from swin_style import SwinStyle, WindowAttention
from torch import nn
from untraceable import untraceable
from zeroing import zero_groups

from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.structure import analyze

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 3, 32, 32)
ZEROED = ("head blocks.0.attention[1]", "head blocks.1.attention[2]", "head blocks.1.attention[3]",
          "head blocks.3.attention[0]")


def _model(traced: str) -> nn.Module:
    torch.manual_seed(0)
    return (SwinStyle if traced == "fx" else untraceable(SwinStyle))().eval()


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
def test_heads_with_a_bias_table_are_found(traced):
    st = analyze(_model(traced), SHAPE)
    assert [(h.name, h.num_heads, h.tables) for h in st.heads] == [
        (f"blocks.{b}.attention", 4, ((f"blocks.{b}.attention.relative_position_bias_table", 1),)) for b in range(4)]
    # In torch.export's graph the merged width is a number; the owner's all_head_size is taken for its source.
    assert all(h.keeps_heads == "" and h.width_attr == "all_head_size" for h in st.heads)


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_swin_heads_are_cut_as_counted(traced, exporter):
    model = _model(traced)
    groups = {g.name: g for g in build_groups(model, SHAPE, ("head",)) if g.removable}
    assert len(groups) == 16
    zero_groups(model, [groups[n] for n in ZEROED])
    result, counted = assert_cut_as_counted(model, SHAPE, exported(model, SHAPE, exporter))
    assert counted.heads == (("blocks.0.attention", 3, 4), ("blocks.1.attention", 2, 4), ("blocks.2.attention", 4, 4),
                             ("blocks.3.attention", 3, 4))
    assert not result.report["blocked_by"] and not result.report["zeros_kept"]


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
def test_swin_heads_thin_exactly(traced):
    model = _model(traced)
    groups = {g.name: g for g in build_groups(model, SHAPE, ("head",)) if g.removable}
    zero_groups(model, [groups[n] for n in ZEROED])
    assert_thinned_exactly(model, SHAPE)
    attention = model.blocks[1].attention
    assert (attention.num_attention_heads, attention.all_head_size) == (2, 8)
    assert attention.relative_position_bias_table.shape == (49, 2) and attention.query.out_features == 8
    assert [b.attention.num_attention_heads for b in model.blocks] == [3, 2, 4, 3]


class SharedTable(nn.Module):
    """The bias table read twice: by the scores and, scaled, by the output. Slicing its heads would change the
    second reader, so the heads are not followed."""

    def __init__(self):
        super().__init__()
        self.attention = WindowAttention(16, 4, 4)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        tokens = F.avg_pool2d(x, 2).flatten(2).transpose(1, 2).repeat(1, 1, 6)[..., :16]  # (B, 256, 16)
        y = self.attention(tokens.reshape(-1, 16, 16))
        return self.head(y.mean(1)) + self.attention.relative_position_bias_table.sum()


class BiasFromInput(nn.Module):
    """A bias per head computed from the input: no parameter to slice, so the heads are not followed."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o, self.bias = (nn.Linear(8, 8) for _ in range(5))

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)  # (B, 16, 8)
        q, k, v = (f(t).view(1, 16, 2, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
        bias = self.bias(t)[..., :2].permute(0, 2, 1).unsqueeze(-1)  # (B, 2, 16, 1)
        p = F.softmax(q @ k.transpose(-1, -2) / 2.0 + bias, dim=-1)
        return self.o((p @ v).transpose(1, 2).reshape(1, 16, 8)).mean(1)


@pytest.mark.parametrize("net,shape", [(SharedTable, (1, 3, 32, 32)), (BiasFromInput, (1, 8, 4, 4))])
def test_a_bias_that_is_not_a_table_of_its_own_hides_the_heads(net, shape):
    assert analyze(net().eval(), shape).heads == []


class ReadsItsWidth(nn.Module):
    """Holds all_head_size, but merges its heads back to the input's width read off a tensor: the thinned forward
    fails, and thinning puts the model back as it was and says why."""

    def __init__(self):
        super().__init__()
        self.attention = WindowAttention(16, 4, 4)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        tokens = F.avg_pool2d(x, 2).flatten(2).transpose(1, 2).repeat(1, 1, 6)[..., :16].reshape(-1, 16, 16)
        att = self.attention
        q, k, v = (att._heads(f(tokens)) for f in (att.query, att.key, att.value))
        p = F.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.head(att.dense((p @ v).transpose(1, 2).reshape(tokens.shape)).mean(1))


def test_a_width_read_off_a_tensor_in_torch_exports_graph_is_undone_by_thinnings_check():
    from sslcompress.finetune.thin import thin

    torch.manual_seed(0)
    model = untraceable(ReadsItsWidth)().eval()
    groups = [g for g in build_groups(model, SHAPE, ("head",)) if g.removable]
    zero_groups(model, groups[:1])
    before = {n: p.clone() for n, p in model.state_dict().items()}
    result = thin(model, SHAPE)
    assert not result.applied and "forward fails" in result.reason
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert model.attention.num_attention_heads == 4


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_attention_branches_rolled_back_are_depth_groups_cut_as_counted(traced, exporter):
    """A shifted block rolls its windows back after the attention: the roll moves zeros, so the branch writes
    zero once its layers are, and it goes whole with its products and its bias table."""
    model = _model(traced)
    groups = {g.name: g for g in build_groups(model, SHAPE, ("depth",)) if g.removable}
    assert sorted(groups) == sorted(f"depth blocks.{b}[{part}]" for b in range(4)
                                    for part in ("norm1,attention", "norm2,fc1,fc2"))
    zero_groups(model, [groups["depth blocks.1[norm1,attention]"], groups["depth blocks.2[norm1,attention]"]])
    result, counted = assert_cut_as_counted(model, SHAPE, exported(model, SHAPE, exporter))
    assert counted.blocks_removed == ("blocks.1[norm1,attention]", "blocks.2[norm1,attention]")
    assert len(result.report["blocks_removed"]) == 2
