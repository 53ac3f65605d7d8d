"""Causal self-attention written out as nanoGPT and Hugging Face's eager path write it: one c_attn Linear split
into q, k and v, the scale 1 / sqrt(k.size(-1)) computed from a size, and a causal mask the same for every head,
by masked_fill of a lower-triangular buffer or added. Each head is a group of its rows of every part of c_attn and
its columns of c_proj; the training counts what the export cuts; thinning keeps the heads where the forward
merges them back to a width read off the input (nanoGPT's view(B, T, C)), and says so."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from counted_cut import assert_cut_as_counted, assert_thinned_exactly, exported
from torch import nn
from zeroing import zero_groups

from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.thin import thin

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 12, 10)  # 12 tokens of 10 features
DIM, HEADS, TOKENS = 32, 4, 12


class CausalSelfAttention(nn.Module):
    def __init__(self, mask: str = "masked_fill", merge: str = "size", sliced: bool = True) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.mask, self.merge, self.sliced = HEADS, DIM, mask, merge, sliced
        self.c_attn = nn.Linear(DIM, 3 * DIM)
        self.c_proj = nn.Linear(DIM, DIM)
        tril = torch.tril(torch.ones(TOKENS, TOKENS))
        if mask in ("per_head", "per_head_sdpa"):  # each head masked its own way: not the same for every head
            tril = tril.expand(HEADS, TOKENS, TOKENS) * torch.arange(1, HEADS + 1).float()[:, None, None]
        self.register_buffer("bias", tril.reshape(1, -1, TOKENS, TOKENS))
        self.register_buffer("additive", torch.zeros(1, 1, TOKENS, TOKENS).masked_fill(
            torch.tril(torch.ones(TOKENS, TOKENS)) == 0, float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # noqa: N806 (nanoGPT's names)
        # nanoGPT's widths come from C and n_embd; "heads" computes them from n_head and a fixed head width,
        # as a forward must for thinning to delete heads.
        width, d = (self.n_embd, C // self.n_head) if self.merge == "size" else (self.n_head * DIM // HEADS, DIM // HEADS)
        q, k, v = self.c_attn(x).split(width, dim=2)
        k = k.view(B, T, self.n_head, d).transpose(1, 2)
        q = q.view(B, T, self.n_head, d).transpose(1, 2)
        v = v.view(B, T, self.n_head, d).transpose(1, 2)
        # nanoGPT slices its mask to the tokens: a slice by a traced size, which torch.fx cannot take (the
        # analysis then reads torch.export's graph); the whole mask, at the tokens it was built for, fx traces.
        additive, bias = (m[:, :, :T, :T] if self.sliced else m for m in (self.additive, self.bias))
        if self.mask in ("sdpa", "per_head_sdpa"):  # Hugging Face's sdpa path: the mask handed to the fused call
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=additive if self.mask == "sdpa" else bias)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            if self.mask == "added":
                att = att + additive
            else:
                att = att.masked_fill(bias == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C if self.merge == "size" else width))


class Net(nn.Module):
    def __init__(self, mask: str = "masked_fill", merge: str = "size", sliced: bool = True) -> None:
        super().__init__()
        self.wte = nn.Linear(10, DIM)
        self.attn = CausalSelfAttention(mask, merge, sliced)
        self.head = nn.Linear(DIM, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wte(x)
        return self.head((h + self.attn(h))[:, -1])


def _net(mask: str = "masked_fill", merge: str = "size", sliced: bool = True) -> Net:
    torch.manual_seed(0)
    return Net(mask, merge, sliced).eval()


@pytest.mark.parametrize("sliced", [True, False], ids=["export-graph", "fx-graph"])
@pytest.mark.parametrize("mask", ["masked_fill", "added", "sdpa"])
def test_each_head_owns_its_rows_of_every_part_of_c_attn(mask, sliced):
    groups = build_groups(_net(mask, sliced=sliced), SHAPE, ("head",))
    assert [g.name for g in groups] == [f"head attn[{h}]" for h in range(HEADS)]
    cols = tuple(range(8, 16))
    rows = tuple(p * DIM + c for p in range(3) for c in cols)
    assert {(s.param, s.axis, tuple(s.index)) for s in groups[1].slices} == {
        ("attn.c_attn.weight", "out", rows), ("attn.c_attn.bias", "out", rows), ("attn.c_proj.weight", "in", cols)}


@pytest.mark.parametrize("mask", ["per_head", "per_head_sdpa"])
@pytest.mark.parametrize("sliced", [True, False], ids=["export-graph", "fx-graph"])
def test_a_mask_that_differs_per_head_keeps_the_heads(sliced, mask):
    assert build_groups(_net(mask, sliced=sliced), SHAPE, ("head",)) == []


@pytest.mark.parametrize("mask", ["masked_fill", "added", "sdpa"])
@pytest.mark.parametrize("exporter", ["legacy17", "dynamo"])
@torch.no_grad()
def test_zero_heads_are_counted_as_the_export_cuts_them(mask, exporter):
    model = _net(mask)
    groups = build_groups(model, SHAPE, ("head",))
    zero_groups(model, [groups[0], groups[2]])
    proto = exported(model, SHAPE, "dynamo") if exporter == "dynamo" else exported(model, SHAPE, opset=17)
    assert_cut_as_counted(model, SHAPE, proto)


def test_thinning_keeps_heads_where_the_forward_merges_them_to_a_width_it_reads_off_a_tensor():
    # torch.export's graph (nanoGPT's sliced mask) records every width as a number: thinning cannot tell.
    model = _net()
    zero_groups(model, [build_groups(model, SHAPE, ("head",))[1]])
    assert "comes from torch.export" in thin(model, SHAPE).reason
    # fx's graph shows the view(B, T, C) with C read off the input, which fewer heads would not fill.
    model = _net(sliced=False)
    zero_groups(model, [build_groups(model, SHAPE, ("head",))[1]])
    assert "reshapes the heads back to the input's width" in thin(model, SHAPE).reason
    assert model.attn.c_attn.weight.shape[0] == 3 * DIM


def test_thinning_deletes_a_head_from_every_part_of_c_attn_and_rewrites_n_head():
    model = _net(merge="heads", sliced=False)
    zero_groups(model, [build_groups(model, SHAPE, ("head",))[1]])
    assert_thinned_exactly(model, SHAPE)
    assert model.attn.n_head == HEADS - 1 and model.attn.c_attn.weight.shape[0] == 3 * (DIM - DIM // HEADS)
