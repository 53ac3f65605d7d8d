"""Attention heads through rotary position embeddings (LLaMA's attention): q and k rotated within each head,
``q * cos + rotate_half(q) * sin``, rotate_half by chunk or by slicing the features as Hugging Face writes it,
q, k and v from separate Linears or one packed qkv Linear.
A head still owns its rows of q, k and v and its columns of the output projection; the training counts what
the export cuts (the surgery's Concat of the rotated halves holds every head in each part), and thinning
deletes heads exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_nets import TwoBlocks
from counted_cut import assert_cut_as_counted, assert_groups_cut_as_counted, assert_thinned_exactly, exported
from torch import nn
from untraceable import untraceable
from zeroing import zero_groups

from sslcompress.finetune.groups import build_groups
from sslcompress.models.vit import rotate_half  # by chunk; the slicing form is below

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 1, 8, 8)  # 16 patch tokens of 2x2
DIM, HEADS, HEAD_DIM, TOKENS = 24, 3, 8, 16


def _rotate_half_slice(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class RotaryAttention(nn.Module):
    def __init__(self, rotate_half, per_head_angles: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.rotate_half = HEADS, HEAD_DIM, rotate_half
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        angles = torch.outer(torch.arange(TOKENS).float(), inv)
        emb = torch.cat((angles, angles), dim=-1)  # (tokens, head_dim): the same for every head
        if per_head_angles:  # (1, heads, tokens, head_dim): each head rotated its own way
            emb = emb[None, None] * torch.arange(1, HEADS + 1).float()[None, :, None, None]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (m(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for m in (self.q, self.k, self.v))
        q = q * self.cos + self.rotate_half(q) * self.sin
        k = k * self.cos + self.rotate_half(k) * self.sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class PackedRotaryAttention(RotaryAttention):
    """q, k and v out of one qkv Linear (timm's reshape, permute and unbind), q and k rotated the same way."""

    def __init__(self, rotate_half, per_head_angles: bool = False) -> None:
        super().__init__(rotate_half, per_head_angles)
        del self.q, self.k, self.v
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.cos + self.rotate_half(q) * self.sin
        k = k * self.cos + self.rotate_half(k) * self.sin
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Net(TwoBlocks):
    def __init__(self, rotate_half, per_head_angles: bool = False, packed: bool = False) -> None:
        attention = PackedRotaryAttention if packed else RotaryAttention
        super().__init__(DIM, lambda: attention(rotate_half, per_head_angles))


ROTATIONS = {"chunk": rotate_half, "slice": _rotate_half_slice}


def _net(rotation: str, per_head_angles: bool = False, packed: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return Net(ROTATIONS[rotation], per_head_angles, packed).eval()


@pytest.mark.parametrize("rotation", ROTATIONS)
def test_each_rotated_head_is_a_group_of_its_rows_and_columns(rotation):
    heads = build_groups(_net(rotation), SHAPE, ("head",))
    assert [g.name for g in heads] == [f"head attn{a}[{h}]" for a in (0, 1) for h in range(HEADS)]
    rows = list(range(HEAD_DIM, 2 * HEAD_DIM))
    assert {(s.param, s.axis, tuple(s.index)) for s in heads[1].slices} == {
        *((f"attn0.{p}.weight", "out", tuple(rows)) for p in "qkv"), ("attn0.o.weight", "in", tuple(rows))}
    # Packed: the head's rows of each of the three parts, and their biases.
    packed = build_groups(_net(rotation, packed=True), SHAPE, ("head",))
    assert {(s.param, tuple(s.index)) for s in packed[1].slices if s.param.startswith("attn0.qkv")} == {
        (f"attn0.qkv.{leaf}", tuple(p * DIM + r for p in range(3) for r in rows)) for leaf in ("weight", "bias")}


def test_a_rotation_that_differs_per_head_or_is_read_elsewhere_keeps_the_heads():
    # Angles of shape (1, heads, tokens, head_dim) rotate each head its own way: a wall, as anything unknown.
    assert build_groups(_net("chunk", per_head_angles=True), SHAPE, ("head",)) == []

    class ReadElsewhere(Net):
        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2)
            a = self.attn0
            b, t, _ = x.shape
            q = a.q(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
            k = a.k(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
            v = a.v(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
            qr = q * a.cos + rotate_half(q) * a.sin
            out = F.scaled_dot_product_attention(qr, k, v)
            y = a.o(out.transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM))
            return self.head((x + y).mean(1) + q.mean((1, 2)).sum(-1, keepdim=True))  # q read outside too

    torch.manual_seed(0)
    assert not [g for g in build_groups(ReadElsewhere(rotate_half), SHAPE, ("head",))
                if g.name.startswith("head attn0")]


@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("exporter", ["legacy17", "legacy18", "dynamo"])
@torch.no_grad()
def test_zero_rotated_heads_are_counted_as_the_export_cuts_them(rotation, exporter, packed):
    model = _net(rotation, packed=packed)
    heads = build_groups(model, SHAPE, ("head",))
    zero_groups(model, [heads[0], heads[HEADS + 2]])
    proto = exported(model, SHAPE, "dynamo") if exporter == "dynamo" else \
        exported(model, SHAPE, opset=int(exporter[-2:]))
    assert_cut_as_counted(model, SHAPE, proto)


@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
@pytest.mark.parametrize("rotation", ROTATIONS)
def test_thinning_zero_rotated_heads_keeps_the_outputs(rotation, packed):
    model = _net(rotation, packed=packed)
    heads = build_groups(model, SHAPE, ("head",))
    zero_groups(model, [heads[0], heads[2], heads[HEADS + 1]])
    assert_thinned_exactly(model, SHAPE)
    assert (model.attn0.num_heads, model.attn1.num_heads) == (HEADS - 2, HEADS - 1)


@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
@torch.no_grad()
def test_rotated_heads_are_found_in_a_torch_export_graph_too(packed):
    torch.manual_seed(0)
    # torch.export's aten call of scaled_dot_product_attention passes its defaults positionally (q, k, v, None,
    # 0.0, True for the causal mask).
    assert_groups_cut_as_counted(untraceable(Net)(rotate_half, packed=packed).eval(), SHAPE, "head",
                                 [f"head attn{a}[{h}]" for a in (0, 1) for h in range(HEADS)], [1, HEADS])
