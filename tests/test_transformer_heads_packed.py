"""Head groups of attention in two more forms: one packed qkv Linear (timm's) and nn.MultiheadAttention.

Each form sits in a small ViT-like model (a patch-embedding conv to a 4x4 token grid, two pre-norm blocks of
dim 32 with 4 heads). The checks: one removable group per head; with some heads zero, the MACs counted on the
torch side are what the ONNX surgery leaves; thinning cuts packed heads exactly and leaves
nn.MultiheadAttention's in place, saying why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zeroing import zero_groups

from sslcompress.finetune.counting import count
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.thin import thin

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 3, 8, 8)
DIM, HEADS = 32, 4
HEAD_DIM = DIM // HEADS


class PackedAttention(nn.Module):
    """timm's attention: one qkv Linear, reshaped to (3, B, H, N, Dh), q, k and v taken out of it.

    `merge_width` "heads" reshapes back to num_heads * head_dim (a thinned attention still fits), "input" to
    the input's width C read off x.shape, as timm writes it."""

    def __init__(self, dim: int, heads: int, *, sdpa: bool = False, index: bool = False,
                 merge_width: str = "heads") -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sdpa, self.index, self.merge_width = sdpa, index, merge_width

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = (qkv[0], qkv[1], qkv[2]) if self.index else qkv.unbind(0)
        if self.sdpa:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            x = attn.softmax(dim=-1) @ v
        width = C if self.merge_width == "input" else self.num_heads * self.head_dim
        return self.proj(x.transpose(1, 2).reshape(B, N, width))


class TorchAttention(nn.Module):
    """nn.MultiheadAttention as self-attention on (B, N, C), batch first or not; with `need_weights` its
    attention weights are computed but unused."""

    def __init__(self, dim: int, heads: int, *, batch_first: bool = True, need_weights: bool = False) -> None:
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)

    def forward(self, x):
        if self.batch_first:
            return self.attn(x, x, x, need_weights=self.need_weights)[0]
        x = x.transpose(0, 1)
        return self.attn(x, x, x, need_weights=self.need_weights)[0].transpose(0, 1)


class Block(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(DIM), attn, nn.LayerNorm(DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyVit(nn.Module):
    def __init__(self, make_attention) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, DIM, 2, stride=2)
        self.blocks = nn.Sequential(*[Block(make_attention()) for _ in range(2)])
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


FORMS = {
    "packed": lambda: PackedAttention(DIM, HEADS),
    "packed-index-sdpa": lambda: PackedAttention(DIM, HEADS, sdpa=True, index=True),
    "packed-timm-width": lambda: PackedAttention(DIM, HEADS, merge_width="input"),
    "mha-batch-first": lambda: TorchAttention(DIM, HEADS),
    "mha-sequence-first": lambda: TorchAttention(DIM, HEADS, batch_first=False),
}


def _model(form: str) -> nn.Module:
    torch.manual_seed(0)
    model = TinyVit(FORMS[form])
    with torch.no_grad():  # biases that do something, so a kept head is never a zero one by chance
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    return model.eval()


def _heads(model: nn.Module) -> list:
    return build_groups(model, SHAPE, ("head",))


def _zero(model: nn.Module, groups) -> None:
    zero_groups(model, groups, rows_and_columns_only=True)


def _outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn((3, *SHAPE[1:]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, model(x)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


# ---------------------------------------------------------------- which groups


@pytest.mark.parametrize("form", list(FORMS))
def test_one_removable_group_per_head(form):
    groups = _heads(_model(form))
    attention = "attn.attn" if form.startswith("mha") else "attn"
    assert [g.name for g in groups] == [f"head blocks.{b}.{attention}[{h}]" for b in range(2) for h in range(HEADS)]
    assert all(g.removable and g.cost > 0 for g in groups)


def _rows_of_head(h: int) -> tuple[int, ...]:
    """Head h's rows of a packed (q, k, v) projection: its head_dim rows in each of the three parts."""
    return tuple(p * DIM + h * HEAD_DIM + d for p in range(3) for d in range(HEAD_DIM))


def test_a_packed_head_owns_its_rows_of_every_part_and_its_projection_columns():
    g = _heads(_model("packed"))[HEADS + 1]
    slices = {(s.param, s.axis): s.index for s in g.slices}
    assert slices == {("blocks.1.attn.qkv.weight", "out"): _rows_of_head(1),
                      ("blocks.1.attn.qkv.bias", "out"): _rows_of_head(1),
                      ("blocks.1.attn.proj.weight", "in"): tuple(range(HEAD_DIM, 2 * HEAD_DIM))}


def test_a_multihead_attention_head_owns_its_in_proj_rows_and_out_proj_columns():
    g = _heads(_model("mha-sequence-first"))[2]
    slices = {(s.param, s.axis): s.index for s in g.slices}
    assert slices == {("blocks.0.attn.attn.in_proj_weight", "out"): _rows_of_head(2),
                      ("blocks.0.attn.attn.in_proj_bias", "out"): _rows_of_head(2),
                      ("blocks.0.attn.attn.out_proj.weight", "in"): tuple(range(2 * HEAD_DIM, 3 * HEAD_DIM))}
    # Its projections are no layers of the analysis: the attention stands for them, and a head costs its share
    # of all of the attention's MACs (projections and products).
    assert g.layers == ("blocks.0.attn.attn",)
    tokens = 16
    whole = 4 * tokens * DIM * DIM + 2 * tokens * tokens * DIM
    assert g.cost == whole // HEADS


def test_multihead_attention_with_a_mask_or_its_weights_read_is_not_followed():
    class Masked(TorchAttention):
        def forward(self, x):
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
            return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]

    class WeightsRead(TorchAttention):
        def forward(self, x):
            out, weights = self.attn(x, x, x)
            return out + weights.mean()

    class WeightsComputed(TorchAttention):
        # need_weights defaults to True: the averaged weights are computed (and exported), though unread.
        def forward(self, x):
            return self.attn(x, x, x)[0]

    for make in (Masked, WeightsRead, WeightsComputed):
        torch.manual_seed(0)
        assert _heads(TinyVit(lambda make=make: make(DIM, HEADS)).eval()) == []


# ---------------------------------------------------------------- counted as the surgery cuts


def _cut_by_surgery(model: nn.Module, dynamic: bool, simplify: bool):
    from sslcompress.surgery.compress import compress
    from sslcompress.surgery.export import export_onnx

    return compress(export_onnx(model, SHAPE, dynamic_batch=dynamic, simplify=simplify).model)


FORMS_CUT = [("packed", False), ("packed", True), ("packed-index-sdpa", False), ("packed-index-sdpa", True),
             ("mha-batch-first", False), ("mha-batch-first", True), ("mha-sequence-first", False),
             ("mha-sequence-first", True)]


@pytest.mark.parametrize(("form", "dynamic", "simplify"), [
    (form, dynamic, simplify) for form, dynamic in FORMS_CUT for simplify in (False, True)])
def test_counted_macs_with_zero_heads_equal_the_cut_onnx_models(form, dynamic, simplify):
    """The export as torch writes it, and as `export` writes it (onnxsim: Linears on tokens flattened into
    rows, the packed heads split straight from the Gemm's rows)."""
    model = _model(form)
    _zero(model, _heads(model)[1::2])
    counted = count(model, SHAPE)
    assert counted.heads == ((counted.heads[0][0], 2, 4), (counted.heads[1][0], 2, 4))
    result = _cut_by_surgery(model, dynamic, simplify=simplify)
    assert result.verification.passed
    assert result.report["totals"]["macs"] == counted.macs
    assert result.report["totals"]["macs_after"] == counted.macs_after < counted.macs


def test_export_turns_the_multihead_attention_fast_path_off_and_back():
    from sslcompress.surgery.export import export_onnx

    model = _model("mha-batch-first")
    was = torch.backends.mha.get_fastpath_enabled()
    try:
        for setting in (True, False):
            torch.backends.mha.set_fastpath_enabled(setting)
            exported = export_onnx(model, SHAPE, simplify=False)
            assert torch.backends.mha.get_fastpath_enabled() is setting
            ops = {n.op_type for n in exported.model.graph.node}
            assert "MatMul" in ops and "Softmax" in ops, ops
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


# ---------------------------------------------------------------- thinning


@pytest.mark.parametrize("form", ["packed", "packed-index-sdpa"])
def test_thinned_packed_heads_give_the_masked_outputs_and_the_head_count_follows(form):
    model = _model(form)
    heads = _heads(model)
    _zero(model, heads[::2])
    x, want = _outputs(model)
    counted = count(model, SHAPE)
    result = thin(model, SHAPE)
    assert result.applied and result.reason == "", result.reason
    with torch.no_grad():
        got = model(x)
    assert _close(got, want)
    assert [b.attn.num_heads for b in model.blocks] == [2, 2]
    assert tuple(model.blocks[0].attn.qkv.weight.shape) == (3 * 2 * HEAD_DIM, DIM)
    assert tuple(model.blocks[0].attn.proj.weight.shape) == (DIM, 2 * HEAD_DIM)
    after = count(model, SHAPE)
    assert after.macs == after.macs_after == counted.macs_after < counted.macs


def test_packed_heads_merged_back_to_the_input_width_are_kept_with_a_reason():
    model = _model("packed-timm-width")
    _zero(model, _heads(model)[::2])
    x, want = _outputs(model)
    result = thin(model, SHAPE)
    assert not result.applied
    assert "reshapes the heads back to the input's width" in result.reason, result.reason
    with torch.no_grad():
        assert torch.equal(model(x), want)
    assert [b.attn.num_heads for b in model.blocks] == [HEADS, HEADS]


@pytest.mark.parametrize("form", ["mha-batch-first", "mha-sequence-first"])
def test_multihead_attention_is_left_unthinned_with_a_reason(form):
    model = _model(form)
    _zero(model, _heads(model)[::2])
    neurons = [g for g in build_groups(model, SHAPE, ("neuron",)) if g.removable]
    _zero(model, neurons[::4])
    x, want = _outputs(model)
    counted = count(model, SHAPE)
    result = thin(model, SHAPE)
    assert result.applied  # the MLP's zero neurons go
    assert "nn.MultiheadAttention cannot hold an inner width" in result.reason, result.reason
    assert "blocks.0.attn.attn, blocks.1.attn.attn" in result.reason
    with torch.no_grad():
        got = model(x)
    assert _close(got, want)
    for b in model.blocks:
        assert b.attn.attn.num_heads == HEADS and tuple(b.attn.attn.in_proj_weight.shape) == (3 * DIM, DIM)
        assert b.fc1.out_features < 2 * DIM
    # The zero heads stay, so the count after thinning still deletes them as the export will.
    assert count(model, SHAPE).macs_after == counted.macs_after
