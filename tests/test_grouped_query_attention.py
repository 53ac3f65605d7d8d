"""Grouped-query attention (LLaMA 2/3, Mistral): k and v with fewer heads than q, each key/value head repeated for
the query heads that share it, by Hugging Face's repeat_kv (unsqueeze, expand, reshape) or by repeat_interleave.
A key/value head and its query heads go as one group; the training counts what the export cuts (the surgery
follows the repeat through Unsqueeze, Expand or Tile and the Reshape that merges the copies), and thinning
deletes the group exactly, rewriting both head counts."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from attention_nets import TwoBlocks
from counted_cut import assert_cut_as_counted, assert_groups_cut_as_counted, assert_thinned_exactly, exported
from torch import nn
from untraceable import untraceable
from zeroing import zero_groups

from sslcompress.finetune.counting import count
from sslcompress.finetune.groups import build_groups
from sslcompress.models.vit import repeat_kv, rotate_half  # Hugging Face's LLaMA writes them so
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 1, 8, 8)  # 16 patch tokens of 2x2
DIM, HEADS, KV_HEADS, HEAD_DIM, TOKENS = 48, 6, 3, 8, 16
COPIES = HEADS // KV_HEADS


class GroupedQueryAttention(nn.Module):
    def __init__(self, repeat: str, rotary: bool = False, kv_attr: str = "num_key_value_heads") -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.repeat, self.rotary = HEADS, HEAD_DIM, repeat, rotary
        if kv_attr:
            setattr(self, kv_attr, KV_HEADS)
        self.kv_attr = kv_attr
        self.q = nn.Linear(DIM, HEADS * HEAD_DIM)
        self.k = nn.Linear(DIM, KV_HEADS * HEAD_DIM)
        self.v = nn.Linear(DIM, KV_HEADS * HEAD_DIM)
        self.o = nn.Linear(HEADS * HEAD_DIM, DIM)
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        emb = torch.outer(torch.arange(TOKENS).float(), inv).repeat(1, 2)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        kv = getattr(self, self.kv_attr) if self.kv_attr else KV_HEADS
        q = self.q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, kv, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, kv, self.head_dim).transpose(1, 2)
        if self.rotary:  # before the repeat, as Hugging Face's LLaMA does
            q = q * self.cos + rotate_half(q) * self.sin
            k = k * self.cos + rotate_half(k) * self.sin
        n_rep = self.num_heads // kv
        if self.repeat in ("repeat_kv", "repeat_kv_sdpa"):
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        elif self.repeat == "flatten":  # the copies merged by flatten(1, 2), with unsqueeze(2) before
            k, v = (t.unsqueeze(2).expand(b, kv, n_rep, t.shape[2], self.head_dim).flatten(1, 2) for t in (k, v))
        elif self.repeat == "interleave":
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        elif self.repeat == "tile":  # heads in the order 0, 1, 2, 0, 1, 2: another pairing, not followed
            k, v = k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1)
        if self.repeat == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif self.repeat == "repeat_kv_sdpa":  # Hugging Face's sdpa attention: repeated, then the fused call
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            out = scores.softmax(dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Net(TwoBlocks):
    def __init__(self, repeat: str, rotary: bool = False, kv_attr: str = "num_key_value_heads") -> None:
        super().__init__(DIM, lambda: GroupedQueryAttention(repeat, rotary, kv_attr))


def _net(repeat: str, rotary: bool = False, kv_attr: str = "num_key_value_heads") -> Net:
    torch.manual_seed(0)
    return Net(repeat, rotary, kv_attr).eval()


@pytest.mark.parametrize("repeat", ["repeat_kv", "flatten", "interleave"])
def test_a_key_value_head_and_its_query_heads_are_one_group(repeat):
    groups = build_groups(_net(repeat), SHAPE, ("head",))
    assert [g.name for g in groups] == [f"head attn{a}[{h}]" for a in (0, 1) for h in range(KV_HEADS)]
    kv_rows = tuple(range(HEAD_DIM, 2 * HEAD_DIM))  # key/value head 1
    q_rows = tuple(range(COPIES * HEAD_DIM, 2 * COPIES * HEAD_DIM))  # query heads 2 and 3
    assert {(s.param, s.axis, tuple(s.index)) for s in groups[1].slices} == {
        *((f"attn0.{p}.{leaf}", "out", kv_rows) for p in "kv" for leaf in ("weight", "bias")),
        *((f"attn0.q.{leaf}", "out", q_rows) for leaf in ("weight", "bias")), ("attn0.o.weight", "in", q_rows)}


def test_other_repeats_are_not_followed():
    # k.repeat(1, R, 1, 1) pairs query head h with key/value head h % kv_heads; SDPA's enable_gqa exports with
    # the heads in the batch axis or in one Attention op: no groups, so nothing counted that the export keeps.
    for repeat in ("tile", "sdpa"):
        assert build_groups(_net(repeat), SHAPE, ("head",)) == []


@pytest.mark.parametrize(("repeat", "rotary", "exporter"), [
    *((repeat, rotary, exporter) for repeat, rotary in [("repeat_kv", False), ("repeat_kv", True),
                                                        ("repeat_kv_sdpa", True), ("flatten", False),
                                                        ("interleave", True)] for exporter in ("legacy17", "dynamo")),
    ("repeat_kv", True, "legacy18")])
@torch.no_grad()
def test_zero_key_value_groups_are_counted_as_the_export_cuts_them(repeat, exporter, rotary):
    model = _net(repeat, rotary)
    groups = build_groups(model, SHAPE, ("head",))
    zero_groups(model, [groups[0], groups[KV_HEADS + 2]])
    proto = exported(model, SHAPE, "dynamo") if exporter == "dynamo" else \
        exported(model, SHAPE, opset=int(exporter[-2:]))
    _, counted = assert_cut_as_counted(model, SHAPE, proto)
    assert counted.heads == (("attn0", HEADS - COPIES, HEADS), ("attn1", HEADS - COPIES, HEADS))


@pytest.mark.parametrize(("repeat", "exporter"), [("repeat_kv", "legacy"), ("interleave", "legacy"),
                                                 ("repeat_kv", "dynamo"), ("repeat_kv_sdpa", "dynamo")])
@torch.no_grad()
def test_a_dynamic_batch_export_is_cut_and_matches_at_other_batches(repeat, exporter):
    # The legacy exporter builds repeat_kv's Expand shape at run time (Shape, Concat, and Where(Equal(s, -1), 1, s))
    # and repeat_interleave as Tile; the merge's copies are read from the Expand's target. Dynamo folds the
    # repeat into scaled_dot_product_attention's trip of K^T through the batch axis ((B, Hkv, R, S, Dh) ->
    # (B * Hkv * R, S, Dh)), which the surgery writes back as the merge of the copies and a Transpose.
    model = _net(repeat, rotary=True)
    groups = build_groups(model, SHAPE, ("head",))
    zero_groups(model, [groups[1], groups[KV_HEADS]])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    proto = export_onnx(model, SHAPE, dynamic_batch=True).model if exporter == "legacy" else torch.onnx.export(
        model, (x,), dynamo=True, input_names=["input"], output_names=["output"], verbose=False,
        dynamic_shapes=({0: torch.export.Dim("batch")},)).model_proto
    result = compress(proto)
    assert result.verification.passed
    assert result.report["totals"]["macs_after"] == count(model, SHAPE).macs_after
    x = np.random.default_rng(2).standard_normal((5, *SHAPE[1:])).astype(np.float32)
    outs = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for p in (proto, result.model)]
    assert np.abs(outs[0] - outs[1]).max() <= 1e-5 * np.abs(outs[0]).max()


@torch.no_grad()
def test_heads_repeated_in_another_order_stay():
    # Query head h reads key/value head h % kv_heads after k.repeat(1, R, 1, 1): the Tile along the heads axis
    # is a wall, and a zero key/value head (with the query heads of the repeat_kv pairing) is kept, exactly.
    model = _net("tile")
    params = dict(model.named_parameters())
    for p in ("k", "v"):
        params[f"attn0.{p}.weight"][:HEAD_DIM] = 0
        params[f"attn0.{p}.bias"][:HEAD_DIM] = 0
    proto = exported(model, SHAPE, opset=17)
    result = compress(proto)
    assert result.verification.passed
    assert result.report["totals"]["macs_after"] == count(model, SHAPE).macs_after
    assert any("Tile" in wall for wall in result.report["blocked_by"])


@pytest.mark.parametrize("repeat", ["repeat_kv", "interleave"])
def test_thinning_a_zero_group_rewrites_both_head_counts(repeat):
    model = _net(repeat, rotary=True)
    groups = build_groups(model, SHAPE, ("head",))
    zero_groups(model, [groups[0], groups[2], groups[KV_HEADS + 1]])
    assert_thinned_exactly(model, SHAPE)
    assert (model.attn0.num_heads, model.attn0.num_key_value_heads) == (HEADS - 2 * COPIES, KV_HEADS - 2)
    assert (model.attn1.num_heads, model.attn1.num_key_value_heads) == (HEADS - COPIES, KV_HEADS - 1)
    assert tuple(model.attn0.k.weight.shape) == ((KV_HEADS - 2) * HEAD_DIM, DIM)


def test_without_a_key_value_head_count_to_rewrite_thinning_keeps_the_heads():
    from sslcompress.finetune.thin import thin

    model = _net("repeat_kv", kv_attr="")
    groups = build_groups(model, SHAPE, ("head",))
    assert len(groups) == 2 * KV_HEADS  # still groups: the export cuts them
    zero_groups(model, [groups[1]])
    result = thin(model, SHAPE)
    assert "no attribute of attn0 holds its 3 key/value heads" in result.reason
    assert model.attn0.q.weight.shape[0] == HEADS * HEAD_DIM


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
@torch.no_grad()
def test_sdpa_with_enable_gqa_exported_as_onnx_attention_loses_zero_groups(dynamic):
    # F.scaled_dot_product_attention(..., enable_gqa=True) has no groups in torch (its exports below opset 23
    # fold the heads into the batch axis), but dynamo writes it at opset 23 as one Attention with q_num_heads
    # and kv_num_heads: the surgery cuts the zero groups there, to what the repeat_kv model of the same
    # weights counts.
    model, twin = _net("sdpa"), _net("repeat_kv")
    groups = build_groups(twin, SHAPE, ("head",))
    zero_groups(twin, [groups[0], groups[KV_HEADS + 1]])
    model.load_state_dict(twin.state_dict())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    extra = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamic else {}
    proto = torch.onnx.export(model, (x,), dynamo=True, opset_version=23, input_names=["input"],
                              output_names=["output"], verbose=False, **extra).model_proto
    assert "Attention" in {n.op_type for n in proto.graph.node}
    result = compress(proto)
    assert result.verification.passed
    assert result.report["totals"]["macs_after"] == count(twin, SHAPE).macs_after < count(twin, SHAPE).macs
    batch = 3 if dynamic else 1
    feed = np.random.default_rng(4).standard_normal((batch, *SHAPE[1:])).astype(np.float32)
    outs = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": feed})[0]
            for p in (proto, result.model)]
    assert np.abs(outs[0] - outs[1]).max() <= 1e-5 * np.abs(outs[0]).max()


@pytest.mark.parametrize("repeat", ["repeat_kv", "interleave"])
@torch.no_grad()
def test_groups_are_found_in_a_torch_export_graph_too(repeat):
    torch.manual_seed(0)
    # torch.export's aten graph repeats by unsqueeze, expand and reshape, or by repeat_interleave.self_int.
    assert_groups_cut_as_counted(untraceable(Net)(repeat, rotary=True).eval(), SHAPE, "head",
                                 [f"head attn{a}[{h}]" for a in (0, 1) for h in range(KV_HEADS)], [2, KV_HEADS])


class SplitQkvAttention(nn.Module):
    """q, k and v out of one Linear split along its features into parts of their own widths (Phi-3's qkv_proj,
    GPT-BigCode's c_attn), k and v with kv_heads heads repeated as repeat_kv does (none where kv_heads = heads)."""

    def __init__(self, kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = HEADS, kv_heads, HEAD_DIM
        self.qkv = nn.Linear(DIM, (HEADS + 2 * kv_heads) * HEAD_DIM)
        self.o = nn.Linear(HEADS * HEAD_DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h, kv, d = self.num_heads, self.num_key_value_heads, self.head_dim
        q, k, v = self.qkv(x).split([h * d, kv * d, kv * d], dim=-1)
        q = q.view(b, t, h, d).transpose(1, 2)
        k = k.view(b, t, kv, d).transpose(1, 2)
        v = v.view(b, t, kv, d).transpose(1, 2)
        if kv != h:
            k, v = repeat_kv(k, h // kv), repeat_kv(v, h // kv)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, t, h * d))


class SplitQkvNet(nn.Module):
    def __init__(self, kv_heads: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, DIM, 2, 2)
        self.attn = SplitQkvAttention(kv_heads)
        self.head = nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head((x + self.attn(x)).mean(1))


@pytest.mark.parametrize("kv_heads", [KV_HEADS, HEADS], ids=["grouped", "one-per-head"])
def test_a_linear_split_into_q_k_and_v_gives_each_group_its_rows_of_every_part(kv_heads):
    torch.manual_seed(0)
    groups = build_groups(SplitQkvNet(kv_heads).eval(), SHAPE, ("head",))
    assert [g.name for g in groups] == [f"head attn[{h}]" for h in range(kv_heads)]
    per = HEADS // kv_heads
    q_rows = list(range(per * HEAD_DIM, 2 * per * HEAD_DIM))  # group 1's query heads
    kv_rows = list(range(HEAD_DIM, 2 * HEAD_DIM))  # key/value head 1
    k0, v0 = HEADS * HEAD_DIM, (HEADS + kv_heads) * HEAD_DIM
    rows = tuple(sorted(q_rows + [k0 + r for r in kv_rows] + [v0 + r for r in kv_rows]))
    assert {(s.param, s.axis, tuple(s.index)) for s in groups[1].slices} == {
        ("attn.qkv.weight", "out", rows), ("attn.qkv.bias", "out", rows), ("attn.o.weight", "in", tuple(q_rows))}


@pytest.mark.parametrize("kv_heads", [KV_HEADS, HEADS], ids=["grouped", "one-per-head"])
@pytest.mark.parametrize("exporter", ["legacy17", "dynamo"])
@torch.no_grad()
def test_zero_groups_of_a_split_qkv_are_counted_as_the_export_cuts_them(kv_heads, exporter):
    torch.manual_seed(0)
    model = SplitQkvNet(kv_heads).eval()
    groups = build_groups(model, SHAPE, ("head",))
    zero_groups(model, [groups[0], groups[2]])
    proto = exported(model, SHAPE, "dynamo") if exporter == "dynamo" else exported(model, SHAPE, opset=17)
    assert_cut_as_counted(model, SHAPE, proto)


def test_thinning_a_split_qkv_keeps_its_parts_in_step():
    torch.manual_seed(0)
    model = SplitQkvNet(KV_HEADS).eval()
    groups = build_groups(model, SHAPE, ("head",))
    zero_groups(model, [groups[1]])
    assert_thinned_exactly(model, SHAPE)
    assert (model.attn.num_heads, model.attn.num_key_value_heads) == (HEADS - COPIES, KV_HEADS - 1)
    assert tuple(model.attn.qkv.weight.shape) == ((HEADS - COPIES + 2 * (KV_HEADS - 1)) * HEAD_DIM, DIM)
