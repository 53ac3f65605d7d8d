"""The torch side of transformer blocks: `neuron` groups (one hidden unit of an MLP block), the channel analysis
on (batch, tokens, features) and channels-last tensors, thinning them out exactly, and MACs that match the
ONNX report's once the export has cut them.

Models are the built-in vit_tiny and convnext_cifar at small inputs, and tiny blocks written here for the forms
a user writes (a 1x1-conv MLP, a Linear MLP on tokens, ops the analysis must not follow).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from counted_cut import assert_thinned_exactly
from torch import nn
from zeroing import zero_groups

from sslcompress.finetune.counting import count
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.structure import analyze
from sslcompress.finetune.thin import thin
from sslcompress.models import ModelSpec, build_model
from sslcompress.models.convnext import ConvNeXt
from sslcompress.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

VIT_SHAPE = (1, 1, 8, 8)
CONVNEXT_SHAPE = (1, 3, 16, 16)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return _randomised(VisionTransformer(10, 1, (8, 8), dim=16, depth=2, num_heads=2))


def _convnext() -> nn.Module:
    torch.manual_seed(0)
    return _randomised(ConvNeXt(10, 3, (16, 16), dims=(8, 16), depths=(1, 1)))


def _randomised(model: nn.Module) -> nn.Module:
    """Biases and norm parameters that do something, so a kept channel is never a zero one by chance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("weight") or p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    return model.eval()


def _zero(model: nn.Module, groups) -> None:
    zero_groups(model, groups, rows_and_columns_only=True)


def _neurons(model: nn.Module, shape) -> list:
    return [g for g in build_groups(model, shape, ("neuron",)) if g.removable]


# ---------------------------------------------------------------- which groups


def test_vit_neurons_are_the_mlp_hidden_units_and_nothing_else():
    model = _vit()
    groups = build_groups(model, VIT_SHAPE, ("neuron",))
    assert all(g.removable for g in groups)
    by_layer: dict[str, int] = {}
    for g in groups:
        assert g.layers[0].endswith("mlp.fc1") and g.layers[1].endswith("mlp.fc2"), g.name
        params = {s.param: s for s in g.slices}
        fc1 = g.layers[0]
        assert params[f"{fc1}.weight"].axis == "out" and params[f"{fc1}.bias"].axis == "out"
        assert params[f"{g.layers[1]}.weight"].axis == "in"
        by_layer[fc1] = by_layer.get(fc1, 0) + 1
    assert by_layer == {"blocks.0.mlp.fc1": 64, "blocks.1.mlp.fc1": 64}


def test_vit_residual_stream_and_attention_are_pinned_with_reasons():
    model = _vit()
    st = analyze(model, VIT_SHAPE)
    for b in range(2):
        fc2 = st.layers[f"blocks.{b}.mlp.fc2"]
        # The residual stream, pinned by LayerNorm even though the position embedding's add met it first.
        assert all("normalises over these channels" in (st.pin_reason(i) or "") for i in fc2.out_ids)
        for proj in ("q", "k", "v"):
            q = st.layers[f"blocks.{b}.attn.{proj}"]
            assert all("view" in (st.pin_reason(i) or "") for i in q.out_ids)  # reshaped into heads
    reasons = {st.pin_reason(i) for i in st.layers["blocks.1.attn.q"].in_ids}
    assert any("layer norm blocks.1.norm1 normalises" in r for r in reasons), reasons


def test_convnext_neurons_and_its_layer_norm_pins():
    model = _convnext()
    st = analyze(model, CONVNEXT_SHAPE)
    groups = build_groups(model, CONVNEXT_SHAPE, ("neuron",))
    assert sorted({g.layers for g in groups}) == [("stages.0.0.pwconv1", "stages.0.0.pwconv2"),
                                                  ("stages.1.2.pwconv1", "stages.1.2.pwconv2")]
    assert all(g.removable for g in groups) and len(groups) == 4 * 8 + 4 * 16
    for name in ("stages.0.0.pwconv2", "stages.0.0.dwconv", "stem.0"):
        (reason,) = {st.pin_reason(i) for i in st.layers[name].out_ids}
        assert reason.startswith("layer norm") and "changes its mean and variance" in reason


class ConvMlp(nn.Module):
    """The 1x1-conv form of an MLP block (NCHW), in a residual block without any norm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Conv2d(6, 12, 1)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.fc2(self.drop(self.act(self.fc1(x))))
        return self.head(x.mean((-2, -1)))


class TokenMlp(nn.Module):
    """Linear-GELU-Dropout-Linear on (batch, tokens, features), the tokens made by a permute."""

    def __init__(self, mixer: str = "") -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)
        self.mixer = mixer

    def forward(self, x):
        x = self.embed(x).flatten(2).permute(0, 2, 1)
        h = F.dropout(F.gelu(self.fc1(x)), 0.1, self.training)
        if self.mixer == "softmax":
            h = h.softmax(-1)
        elif self.mixer == "sum":
            h = h - h.sum(-1, keepdim=True)
        elif self.mixer == "tokens":
            h = h.transpose(1, 2)
            h = h * 2.0
            h = h.transpose(1, 2)
        x = x + self.fc2(h)
        return self.head(x.mean(1))


def test_neurons_of_a_1x1_conv_mlp():
    model = _randomised(ConvMlp())
    groups = build_groups(model, (1, 3, 6, 6), ("neuron",))
    assert {g.layers for g in groups} == {("fc1", "fc2")}
    assert len(groups) == 12 and all(g.removable for g in groups)


def test_neurons_of_a_token_mlp_and_its_macs():
    model = _randomised(TokenMlp())
    groups = _neurons(model, (1, 3, 6, 6))
    assert len(groups) == 16 and all(g.layers == ("fc1", "fc2") for g in groups)
    st = analyze(model, (1, 3, 6, 6))
    assert st.layers["fc1"].macs == 9 * 8 * 16  # 9 tokens x in x out
    assert st.layers["fc2"].macs == 9 * 16 * 8
    assert st.layers["head"].macs == 8 * 4
    # The residual stream (what fc2 writes) is read by fc1 too, but the embedding's reshape pins it.
    assert all(st.pin_reason(i) for i in st.layers["fc2"].out_ids)


@pytest.mark.parametrize("mixer, why", [("softmax", "softmax"), ("sum", "sum")])
def test_ops_that_mix_hidden_units_pin_them(mixer, why):
    model = _randomised(TokenMlp(mixer))
    assert _neurons(model, (1, 3, 6, 6)) == []
    st = analyze(model, (1, 3, 6, 6))
    reasons = {st.pin_reason(i) for i in st.layers["fc1"].out_ids}
    assert len(reasons) == 1 and why in reasons.pop()


def test_a_transpose_there_and_back_is_followed():
    model = _randomised(TokenMlp("tokens"))
    groups = _neurons(model, (1, 3, 6, 6))
    assert len(groups) == 16 and all(g.layers == ("fc1", "fc2") for g in groups)


def test_a_layer_norm_over_hidden_units_pins_them():
    class NormedMlp(TokenMlp):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2)
            return self.head((x + self.fc2(self.norm(F.gelu(self.fc1(x))))).mean(1))

    model = _randomised(NormedMlp())
    st = analyze(model, (1, 3, 6, 6))
    reasons = {st.pin_reason(i) for i in st.layers["fc1"].out_ids}
    assert reasons == {"layer norm norm normalises over these channels (deleting a channel, even a zero one, "
                       "changes its mean and variance)"}


# ---------------------------------------------------------------- thinning


@pytest.mark.parametrize("make, shape", [(_vit, VIT_SHAPE), (_convnext, CONVNEXT_SHAPE),
                                         (lambda: _randomised(ConvMlp()), (1, 3, 6, 6)),
                                         (lambda: _randomised(TokenMlp("tokens")), (1, 3, 6, 6))])
def test_thinned_neurons_give_the_masked_outputs(make, shape):
    model = make()
    groups = _neurons(model, shape)
    zeroed = groups[::3]
    _zero(model, zeroed)
    x = torch.randn((3, *shape[1:]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    params_before = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(x).square().sum().backward()
    opt.step()  # momentum buffers of the full widths, for thinning to cut
    _zero(model, zeroed)
    model.eval()
    with torch.no_grad():
        want = model(x)
    result = thin(model, shape, optimizer=opt)
    assert result.applied, result.reason
    assert sum(p.numel() for p in model.parameters()) < params_before
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    for p in model.parameters():
        buf = opt.state[p].get("momentum_buffer")
        assert buf is not None and buf.shape == p.shape
    first = zeroed[0].layers[0]
    kept = model.get_submodule(first)
    width = kept.out_features if isinstance(kept, nn.Linear) else kept.out_channels
    total = sum(1 for g in groups if g.layers[0] == first)
    assert width == total - sum(1 for g in zeroed if g.layers[0] == first)


# ---------------------------------------------------------------- MACs against the ONNX report


def test_convnext_blocks_are_depth_groups():
    # The branch runs channels-last between two permutes, through a LayerNorm whose scale and shift are in the
    # group: all of it zero, it writes zero, and the cut deletes it whole.
    model = _convnext()
    groups = build_groups(model, CONVNEXT_SHAPE, ("depth",))
    assert [g.name for g in groups] == ["depth stages.0.0", "depth stages.1.2"]
    assert {s.param.rsplit(".", 1)[0] for s in groups[0].slices} == {
        f"stages.0.0.{m}" for m in ("dwconv", "norm", "pwconv1", "pwconv2")}


@pytest.mark.parametrize("emptied", ["branch", "pwconv1"])
def test_convnext_branch_cut_by_the_export_is_counted_cut(emptied):
    # All of a block's parameters zero: the branch writes zero and goes. Only its first Linear's: the second reads
    # only zeros and writes its bias, a constant the cut adds instead, and the branch goes all the same.
    from sslcompress.surgery.compress import compress
    from sslcompress.surgery.export import export_onnx

    model = _convnext()
    block = model.get_submodule("stages.0.0")
    with torch.no_grad():
        for p in (block.parameters() if emptied == "branch" else block.pwconv1.parameters()):
            p.zero_()
    counted = count(model, CONVNEXT_SHAPE)
    result = compress(export_onnx(model, CONVNEXT_SHAPE).model)
    assert result.report["verification"]["passed"]
    gone = result.report["blocks_removed"] if emptied == "branch" else result.report["blocks_constant"]
    assert len(gone) == 1
    assert result.report["zero_branches_kept"] == {}  # not the Adds inside the GELU of the branch that went
    assert result.report["totals"]["macs_after"] == counted.macs_after
    assert counted.blocks_removed == (("stages.0.0",) if emptied == "branch" else ())
    assert all(lay.removed for lay in counted.layers if lay.name.startswith("stages.0.0."))


def test_vit_mlp_and_attention_branches_are_depth_groups_named_apart():
    # The residual stream's features are pinned (its LayerNorms), but the sum of a branch is still a sum: a
    # pre-norm MLP branch (its LayerNorm's scale and shift in the group) writes zero once its group is zero.
    # So does the attention branch: a softmax of zeros is not zero, but the output projection after it is.
    groups = build_groups(_vit(), VIT_SHAPE, ("depth",))
    assert [g.name for g in groups] == ["depth blocks.0[norm1,attn]", "depth blocks.0[norm2,mlp]",
                                        "depth blocks.1[norm1,attn]", "depth blocks.1[norm2,mlp]"]
    assert {s.param.rsplit(".", 1)[0] for s in groups[3].slices} == {
        "blocks.1.norm2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"}
    assert {s.param.rsplit(".", 1)[0] for s in groups[2].slices} == {
        "blocks.1.norm1", "blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v", "blocks.1.attn.proj"}


@torch.no_grad()
def test_a_zero_attention_branch_goes_with_its_products_as_counted():
    from sslcompress.surgery.compress import compress
    from sslcompress.surgery.export import export_onnx

    model = _vit()
    groups = {g.name: g for g in build_groups(model, VIT_SHAPE, ("depth",))}
    params = dict(model.named_parameters())
    for s in groups["depth blocks.1[norm1,attn]"].slices:
        params[s.param].zero_()
    counted = count(model, VIT_SHAPE)
    dense = count(_vit(), VIT_SHAPE)
    result = compress(export_onnx(model, VIT_SHAPE).model)
    assert result.report["verification"]["passed"]
    assert counted.blocks_removed == ("blocks.1[norm1,attn]",) and len(result.report["blocks_removed"]) == 1
    assert [kept for _, kept, _ in counted.heads] == [counted.heads[0][2], 0]
    assert result.report["totals"]["macs_after"] == counted.macs_after
    # The export of the zeroed model computes what the dense count says (its q, k and v weights, all zero, are
    # equal: merged into one initializer, onnxsim made one MatMul of k and v, and `export` refused the
    # checkpoint for computing fewer MACs than it counted).
    assert result.report["totals"]["macs"] == counted.macs == dense.macs
    # q k^T and the weighted sum of v are no layers' MACs: they go too.
    layers_gone = sum(lay.macs for lay in counted.layers if lay.name.startswith("blocks.1.attn."))
    assert dense.macs - counted.macs_after > layers_gone


@torch.no_grad()
def test_vit_mlp_branches_cut_by_the_export_are_counted_cut():
    from sslcompress.surgery.compress import compress
    from sslcompress.surgery.export import export_onnx

    model = _vit()
    for p in (*model.blocks[0].mlp.parameters(), *model.blocks[0].norm2.parameters()):
        p.zero_()  # zero: the branch goes
    for p in model.blocks[1].mlp.fc1.parameters():
        p.zero_()  # its second Linear writes its bias: the branch becomes that constant
    counted = count(model, VIT_SHAPE)
    result = compress(export_onnx(model, VIT_SHAPE).model)
    assert result.report["verification"]["passed"]
    assert len(result.report["blocks_removed"]) == 1 and len(result.report["blocks_constant"]) == 1
    assert counted.blocks_removed == ("blocks.0[norm2,mlp]",)
    assert result.report["totals"]["macs_after"] == counted.macs_after
    assert all(lay.removed for lay in counted.layers if ".mlp." in lay.name)


@pytest.mark.parametrize("make, shape", [(_vit, VIT_SHAPE), (_convnext, CONVNEXT_SHAPE)])
def test_counted_macs_equal_the_cut_onnx_models(make, shape):
    from sslcompress.surgery.compress import compress
    from sslcompress.surgery.export import export_onnx

    model = make()
    _zero(model, _neurons(model, shape)[::2])
    counted = count(model, shape)
    result = compress(export_onnx(model, shape).model)
    assert result.report["verification"]["passed"]
    assert result.report["totals"]["macs"] == counted.macs
    assert result.report["totals"]["macs_after"] == counted.macs_after
    assert counted.macs_after < counted.macs


def test_attention_products_are_counted():
    model = _vit()
    st = analyze(model, VIT_SHAPE)
    tokens, dim, blocks = 17, 16, 2  # 8x8 digits in 2x2 patches, and the class token
    assert st.matmul_macs == blocks * 2 * tokens * tokens * dim  # q k^T and p v, every head together


def test_builtins_analyse_at_their_design_input():
    for name in ("vit_tiny", "convnext_cifar"):
        model = build_model(ModelSpec(name, 10, 3, (32, 32)))
        groups = build_groups(model, (1, 3, 32, 32), ("neuron",))
        assert groups and all(g.removable for g in groups)


class TorchAttention(nn.Module):
    """nn.MultiheadAttention in a pre-norm block: read as one op that mixes its features, counted whole."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 2, stride=2)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


def test_multihead_attention_is_counted_whole_and_its_features_pinned():
    model = _randomised(TorchAttention())
    st = analyze(model, (1, 3, 8, 8))
    tokens, dim = 16, 16
    assert st.matmul_macs == 4 * tokens * dim * dim + 2 * tokens * tokens * dim  # q, k, v, out; two products
    assert "attn" not in st.layers
    assert all(st.pin_reason(i) for i in st.layers["fc2"].out_ids)
    assert len(_neurons(model, (1, 3, 8, 8))) == 32


# ---------------------------------------------------------------- attention heads


def _vit3() -> nn.Module:
    torch.manual_seed(0)
    return _randomised(VisionTransformer(10, 1, (8, 8), dim=24, depth=2, num_heads=3))


class SdpaAttention(nn.Module):
    """Heads through F.scaled_dot_product_attention, the head count a module attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.embed = nn.Conv2d(3, 16, 2, stride=2)
        self.q, self.k, self.v, self.proj = (nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, s, d = x.shape
        q, k, v = (f(x).view(b, s, self.num_heads, d // 2).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, self.num_heads * (d // 2))
        return self.head((x + self.proj(a)).mean(1))


def _heads(model, shape):
    return [g for g in build_groups(model, shape, ("head",))]


def test_head_groups_own_q_k_v_rows_and_projection_columns():
    model = _vit3()
    groups = _heads(model, VIT_SHAPE)
    assert [g.name for g in groups] == [f"head blocks.{b}.attn[{h}]" for b in range(2) for h in range(3)]
    g = groups[1]
    assert all(g.removable for g in groups)
    slices = {(s.param, s.axis): s.index for s in g.slices}
    for lin in ("q", "k", "v"):
        assert slices[(f"blocks.0.attn.{lin}.weight", "out")] == tuple(range(8, 16))
        assert slices[(f"blocks.0.attn.{lin}.bias", "out")] == tuple(range(8, 16))
    assert slices[("blocks.0.attn.proj.weight", "in")] == tuple(range(8, 16))
    assert len(slices) == 7


def test_heads_not_of_the_followed_form_are_not_groups():
    class Mixed(SdpaAttention):
        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2)
            b, s, d = x.shape
            q, k, v = (f(x).view(b, s, 2, d // 2).transpose(1, 2) for f in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v)
            a = a + a.mean(1, keepdim=True)  # mixes the heads before the projection
            return self.head((x + self.proj(a.transpose(1, 2).reshape(b, s, d))).mean(1))

    assert _heads(_randomised(SdpaAttention()), (1, 3, 8, 8))
    assert _heads(_randomised(Mixed()), (1, 3, 8, 8)) == []
    # nn.MultiheadAttention is followed too (tests/test_transformer_heads_packed.py): one group per head.
    assert len(_heads(_randomised(TorchAttention()), (1, 3, 8, 8))) == 2


@pytest.mark.parametrize("make, shape", [(_vit3, VIT_SHAPE), (lambda: _randomised(SdpaAttention()), (1, 3, 8, 8))])
def test_thinned_heads_give_the_masked_outputs_and_the_head_count_follows(make, shape):
    model = make()
    heads = _heads(model, shape)
    _zero(model, heads[::2])
    assert_thinned_exactly(model, shape)
    owners = [m for m in model.modules() if isinstance(getattr(m, "num_heads", None), int)]
    assert sum(m.num_heads for m in owners) == len(heads) - len(heads[::2])


def test_counted_macs_with_zero_heads_equal_the_cut_onnx_models():
    # (The exporter fuses SdpaAttention's projections and product into one ONNX Attention op, whose MACs the
    # ONNX report does not count, so only the written-out attention is compared here.)
    from sslcompress.surgery.compress import compress
    from sslcompress.surgery.export import export_onnx

    model, shape = _vit3(), VIT_SHAPE
    groups = build_groups(model, shape, ("head", "neuron"))
    _zero(model, [g for g in groups if g.kind == "head"][::2] + [g for g in groups if g.kind == "neuron"][::3])
    counted = count(model, shape)
    result = compress(export_onnx(model, shape, opset=18).model)
    assert result.report["verification"]["passed"]
    assert result.report["totals"]["macs"] == counted.macs
    assert result.report["totals"]["macs_after"] == counted.macs_after < counted.macs


def test_an_attention_with_every_head_zero_keeps_one():
    model = _vit3()
    heads = _heads(model, VIT_SHAPE)
    _zero(model, heads[:3])
    counted = count(model, VIT_SHAPE)
    one_head = sum(g.cost for g in heads[:1])  # its rows, columns and products
    assert counted.macs - counted.macs_after == 2 * one_head
    result = thin(model, VIT_SHAPE)
    assert result.applied and model.blocks[0].attn.num_heads == 1 and model.blocks[1].attn.num_heads == 3


def test_attention_weights_read_elsewhere_keep_the_heads():
    class Returning(SdpaAttention):
        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2)
            b, s, d = x.shape
            q, k, v = (f(x).view(b, s, 2, d // 2).transpose(1, 2) for f in (self.q, self.k, self.v))
            p = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
            a = (p @ v).transpose(1, 2).reshape(b, s, d)
            return self.head((x + self.proj(a)).mean(1)), p

    class Plain(Returning):
        def forward(self, x):
            return super().forward(x)[0]

    assert len(_heads(_randomised(Plain()), (1, 3, 8, 8))) == 2
    assert _heads(_randomised(Returning()), (1, 3, 8, 8)) == []


class SharedMlp(nn.Module):
    """One MLP applied twice to the tokens (shared weights), then once to a transposed tensor."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.square = nn.Linear(9, 9)
        self.head = nn.Linear(8, 4)
        self.transposed = transposed

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        if self.transposed:  # the same hidden units read along tokens: rows and columns mean other things
            x = self.square(x.transpose(1, 2)).transpose(1, 2) + self.square(self.square(x.transpose(1, 2))).transpose(1, 2)
        return self.head(x.mean(1))


def test_a_linear_called_twice_counts_twice_and_shares_its_neurons():
    model = _randomised(SharedMlp(False))
    st = analyze(model, (1, 3, 6, 6))
    assert st.layers["fc1"].macs == 2 * 9 * 8 * 16
    groups = _neurons(model, (1, 3, 6, 6))
    assert len(groups) == 16
    _zero(model, groups[::2])
    x = torch.randn((2, 3, 6, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    assert thin(model, (1, 3, 6, 6)).applied
    with torch.no_grad():
        assert torch.allclose(model(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_a_linear_called_again_on_other_features_pins_them():
    model = _randomised(SharedMlp(True))
    st = analyze(model, (1, 3, 6, 6))
    assert st.layers["square"].macs == 3 * 8 * 9 * 9
    reasons = {st.pin_reason(i) for i in st.layers["square"].out_ids}
    assert all(reasons) and len(_neurons(model, (1, 3, 6, 6))) == 16


def test_the_report_prints_branch_names_with_their_brackets(capsys):
    from sslcompress.console import print_report

    print_report({"blocks_total": 2, "blocks_removed": ["blocks.0[norm2,mlp]"], "layers": [],
                  "totals": {"macs": 1, "macs_after": 1, "macs_fraction": 1.0, "macs_gemm_after": 1,
                             "macs_gemm_fraction": 1.0, "params": 1, "params_after": 1}})
    assert "residual blocks removed: 1/2 (blocks.0[norm2,mlp])" in capsys.readouterr().out


def _rms_vit() -> nn.Module:
    """The small ViT with its LayerNorms replaced by RMSNorms, as LLaMA-style blocks normalise."""
    model = _vit()
    dim = model.norm.normalized_shape[0]
    for block in model.blocks:
        block.norm1, block.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
    model.norm = nn.RMSNorm(dim, eps=1e-6)
    return _randomised(model).eval()


@torch.no_grad()
def test_rms_norm_exports_as_the_ops_it_computes():
    import numpy as np
    import onnxruntime as ort

    from sslcompress.surgery.export import export_onnx
    from sslcompress.surgery.rms_norm_export import _registered_by_caller

    model = _rms_vit()
    for opset in (17, 18):  # ReduceMean's axes an attribute, then an input
        proto = export_onnx(model, VIT_SHAPE, opset=opset, dynamic_batch=True).model
        assert sum(n.op_type == "ReduceMean" for n in proto.graph.node) == 5  # 2 per block and the last norm
        x = torch.randn(3, *VIT_SHAPE[1:], generator=torch.Generator().manual_seed(1))
        got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"input": x.numpy()})[0]
        want = model(x).numpy()
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert not _registered_by_caller(17)  # the symbolic is gone once the export is done


@torch.no_grad()
def test_a_half_precision_rms_norm_computes_in_float32_as_torch_does():
    import io

    import numpy as np
    import onnxruntime as ort

    from sslcompress.surgery.rms_norm_export import rms_norm_exportable

    norm = nn.RMSNorm(24).half()
    norm.weight.uniform_(-1, 1)
    x = (100 * torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0))).half()  # squares past fp16's range
    buf = io.BytesIO()
    with rms_norm_exportable(17):
        torch.onnx.export(norm, (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    got = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    want = norm(x).numpy()
    assert np.isfinite(got).all() and got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - want.astype(np.float32)).max() <= 2e-3 * np.abs(want).max()


def test_rms_norm_mlp_branches_are_depth_groups_cut_and_counted():
    from sslcompress.surgery.compress import compress
    from sslcompress.surgery.export import export_onnx

    model = _rms_vit()
    groups = [g for g in build_groups(model, VIT_SHAPE, ("depth",)) if g.name.endswith("[norm2,mlp]")]
    assert [g.name for g in groups] == ["depth blocks.0[norm2,mlp]", "depth blocks.1[norm2,mlp]"]
    assert {s.param.rsplit(".", 1)[0] for s in groups[0].slices} == {
        "blocks.0.norm2", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    # The stream's features stay: the RMSNorms divide each by the mean square of all.
    st = analyze(model, VIT_SHAPE)
    reasons = {st.pin_reason(i) for i in st.layers["blocks.1.attn.q"].in_ids}
    assert any("RMS norm blocks.1.norm1 normalises" in (r or "") for r in reasons), reasons
    with torch.no_grad():
        params = dict(model.named_parameters())
        for s in groups[0].slices:
            params[s.param].zero_()
    counted = count(model, VIT_SHAPE)
    result = compress(export_onnx(model, VIT_SHAPE).model)
    assert result.report["verification"]["passed"]
    assert counted.blocks_removed == ("blocks.0[norm2,mlp]",) and len(result.report["blocks_removed"]) == 1
    assert result.report["totals"]["macs_after"] == counted.macs_after < counted.macs


@pytest.mark.parametrize("opset", [18, 23])  # RMSNorm written out (Pow, ReduceMean, Sqrt, Reciprocal), then one op
def test_a_dynamo_exported_rms_norm_model_loses_its_zero_mlp_branch(opset):
    import numpy as np
    import onnxruntime as ort
    from corpus import torch_models as T

    from sslcompress.surgery.compress import compress

    model = _rms_vit()
    groups = build_groups(model, VIT_SHAPE, ("depth",))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for s in groups[1].slices:
            params[s.param].zero_()
    counted = count(model, VIT_SHAPE)
    x = torch.randn(2, *VIT_SHAPE[1:], generator=torch.Generator().manual_seed(0))
    with T._quiet():
        proto = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["input"],
                                  output_names=["output"]).model_proto
    assert any(n.op_type == ("RMSNormalization" if opset >= 23 else "ReduceMean") for n in proto.graph.node)
    result = compress(proto, inputs=[x.numpy()])
    assert result.verification.passed and len(result.report["blocks_removed"]) == 1
    assert result.report["totals"]["macs_after"] == counted.macs_after
    y = torch.randn(2, *VIT_SHAPE[1:], generator=torch.Generator().manual_seed(1)).numpy()
    outs = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": y})[0]
            for p in (proto, result.model)]
    assert np.abs(outs[0] - outs[1]).max() <= 1e-5 * np.abs(outs[0]).max()
