"""Transformer blocks through the surgery: MLP hidden neurons and attention heads whose weights are
zero are deleted, exactly.

Small pre-norm blocks (LayerNorm, attention, residual, LayerNorm, Linear-GELU-Linear, residual) are
built in torch, some neurons and heads zeroed in the weights, exported by the legacy exporter
(opsets 14 to 20) and by the dynamo exporter (opsets 18 and 23), with static and dynamic batch and
sequence; attention written out (separate q/k/v, packed qkv, SDPA, causal masks) and
nn.MultiheadAttention. Fused attention ops (ONNX Attention, ORT's contrib Attention and
MultiHeadAttention) are written with onnx.helper. The compact model is compared with the uncut one
in ONNX Runtime, and the weights and Reshape targets that must shrink are checked to have shrunk.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from corpus import run
from torch import nn

import sslcompress

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-4  # of max |output|, as the foreign corpus holds every fp32 model


# ---------------------------------------------------------------- the blocks


class HandAttention(nn.Module):
    """Attention written out: separate q/k/v Linears or one packed qkv, softmax or SDPA."""

    def __init__(self, d: int, h: int, packed: bool | str = False, sdpa: bool = False, causal: bool = False) -> None:
        super().__init__()
        self.h, self.dh, self.packed, self.sdpa, self.causal = h, d // h, packed, sdpa, causal
        if packed:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        if self.packed == "slices":  # (B, S, 3, D), each part sliced out, then split into heads
            t = self.qkv(x).reshape(b, s, 3, d)
            q, k, v = (t[:, :, i:i + 1].squeeze(2).reshape(b, s, self.h, self.dh).transpose(1, 2) for i in range(3))
        elif self.packed:
            q, k, v = self.qkv(x).reshape(b, s, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        else:
            q = self.q(x).reshape(b, s, self.h, self.dh).transpose(1, 2)
            k = self.k(x).reshape(b, s, self.h, self.dh).transpose(1, 2)
            v = self.v(x).reshape(b, s, self.h, self.dh).transpose(1, 2)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            a = (q @ k.transpose(-2, -1)) / self.dh ** 0.5 if self.causal else (q @ k.transpose(-2, -1)) * self.dh ** -0.5
            if self.causal:  # masked_fill: a Where in the graph
                a = a.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
            o = a.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, s, d))

    def value_rows(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packed:
            return self.qkv.weight[2 * d:], self.qkv.bias[2 * d:]
        return self.v.weight, self.v.bias


class Block(nn.Module):
    """Pre-norm transformer block; ``attention`` is mha (nn.MultiheadAttention), separate, packed or sdpa."""

    def __init__(self, d: int = 32, h: int = 4, f: int = 64, attention: str = "separate",
                 gelu: str = "none", causal: bool = False) -> None:
        super().__init__()
        self.d, self.h, self.attention = d, h, attention
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        if attention == "mha":
            self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        else:
            packed = "slices" if attention == "packed-slices" else attention == "packed"
            self.attn = HandAttention(d, h, packed=packed, sdpa=attention == "sdpa", causal=causal)
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)
        self.act = nn.GELU(approximate=gelu)

    def forward(self, x):
        y = self.n1(x)
        y = self.attn(y, y, y, need_weights=False)[0] if self.attention == "mha" else self.attn(y)
        x = x + y
        return x + self.fc2(self.act(self.fc1(self.n2(x))))


def block(seed: int = 0, **kw) -> Block:
    torch.manual_seed(seed)
    m = Block(**kw).eval()
    with torch.no_grad():  # biases away from 0, so a zero row with its bias kept is a constant neuron
        for p in m.parameters():
            if p.ndim == 1:
                p.uniform_(-0.5, 0.5)
    return m


def zero_neurons(m: Block, neurons, how: str) -> None:
    """rows: fc1 rows and biases (a zero neuron); constant: fc1 rows only (gelu(b), to fold);
    columns: fc2 columns (a neuron no one reads)."""
    with torch.no_grad():
        for n in neurons:
            if how == "columns":
                m.fc2.weight[:, n] = 0
            else:
                m.fc1.weight[n] = 0
                if how == "rows":
                    m.fc1.bias[n] = 0


def zero_heads(m: Block, heads, how: str) -> None:
    """rows: value rows and biases of the head; constant: value rows only (the head's output is its value
    bias, a constant folded into the output projection's bias); columns: the output projection's columns."""
    d, dh = m.d, m.d // m.h
    with torch.no_grad():
        for hd in heads:
            sl = slice(hd * dh, (hd + 1) * dh)
            if m.attention == "mha":
                w, b, proj = m.attn.in_proj_weight[2 * d:], m.attn.in_proj_bias[2 * d:], m.attn.out_proj
            else:
                (w, b), proj = m.attn.value_rows(d), m.attn.proj
            if how == "columns":
                proj.weight[:, sl] = 0
            else:
                w[sl] = 0
                if how == "rows":
                    b[sl] = 0


def export(m: nn.Module, exporter: str, opset: int = 17, dynamic: bool = False, b: int = 2, s: int = 7) -> onnx.ModelProto:
    torch.backends.mha.set_fastpath_enabled(False)  # the fast path exports a fused op, not the math
    x = torch.randn(b, s, m.d, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            shapes = {"x": {0: torch.export.Dim("batch", min=1, max=64),
                            1: torch.export.Dim("seq", min=2, max=64)}} if dynamic else None
            return torch.onnx.export(m, (x,), dynamo=True, opset_version=opset, input_names=["x"],
                                     output_names=["y"], dynamic_shapes=shapes, verbose=False).model_proto
        buf = io.BytesIO()
        axes = {"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}} if dynamic else None
        torch.onnx.export(m, (x,), buf, dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"], dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


# ---------------------------------------------------------------- checking


def feeds(proto: onnx.ModelProto, d: int, seed: int) -> dict[str, np.ndarray]:
    """A batch of the exported shape where it is static, of another batch and length where dynamic."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = [x.dim_value if x.HasField("dim_value") else (3 + seed, 5 + 4 * seed)[i] for i, x in enumerate(dims)]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def assert_exact(proto: onnx.ModelProto, compact: onnx.ModelProto, d: int) -> None:
    for seed in (0, 1):
        feed = feeds(proto, d, seed)
        want, got = run(proto, feed), run(compact, feed)
        for k, w in want.items():
            g = got[k]
            assert g.shape == w.shape and g.dtype == w.dtype, (k, g.shape, w.shape)
            scale, diff = float(np.max(np.abs(w))), float(np.max(np.abs(w.astype(np.float64) - g)))
            assert np.isfinite(g).all() and diff <= RTOL * scale, f"{k}: max |diff| {diff:.3g} vs max {scale:.3g}"


def compress(proto: onnx.ModelProto, d: int):
    res = sslcompress.compress(proto, inputs=[feeds(proto, d, 2)], shape_lowering="off")
    assert res.verification.passed, res.report["verification"]
    onnx.checker.check_model(res.model, full_check=True)
    assert_exact(proto, res.model, d)
    return res


def weights(model: onnx.ModelProto, ops: tuple[str, ...] = ("MatMul", "Gemm")) -> list[tuple[int, ...]]:
    """The constant weight shapes of MatMul and Gemm nodes, in graph order (as (in, out) for a Gemm with transB)."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    consts = {n.output[0]: tuple(n.attribute[0].t.dims) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR}
    shapes = []
    for n in model.graph.node:
        if n.op_type in ops and len(n.input) > 1 and (n.input[1] in inits or n.input[1] in consts):
            s = inits.get(n.input[1]) or consts[n.input[1]]
            trans = any(a.name == "transB" and a.i for a in n.attribute)
            shapes.append(s[::-1] if trans else s)
    return shapes


def mlp_widths(model: onnx.ModelProto, d: int) -> tuple[int, int]:
    """Hidden width as the first and the second MLP weight see it (the last two layers)."""
    first, second = weights(model)[-2:]
    assert first[0] == d and second[1] == d, weights(model)
    return first[1], second[0]


def head_widths(model: onnx.ModelProto) -> list[int]:
    """Attention widths: each input projection's output (q, k, v or the packed qkv), then the output
    projection's input (every layer before the MLP's two)."""
    attention = weights(model)[:-2]
    return [s[1] for s in attention[:-1]] + [attention[-1][0]]


# ---------------------------------------------------------------- part 1: MLP neurons

EXPORTS = [  # (attention, exporter, opset, dynamic)
    pytest.param("mha", "legacy", 14, False, id="mha-legacy14"),  # LayerNorm written out
    pytest.param("mha", "legacy", 17, False, id="mha-legacy17"),
    pytest.param("separate", "legacy", 18, True, id="separate-legacy18-dynamic"),
    pytest.param("separate", "legacy", 20, False, id="separate-legacy20-gelu-op"),
    pytest.param("mha", "dynamo", 18, False, id="mha-dynamo"),
    pytest.param("separate", "dynamo", 18, True, id="separate-dynamo-dynamic"),
]

# Every way a neuron dies, in one block: zero rows with their biases, zero rows whose constant gelu(b)
# folds into the next bias, zero columns of the second weight.
NEURONS = {"rows": [1, 5], "constant": [9, 20], "columns": [40]}


@functools.cache
def mlp_case(attention: str, exporter: str, opset: int, dynamic: bool, gelu: str = "none"):
    m = block(attention=attention, gelu=gelu)
    for how, neurons in NEURONS.items():
        zero_neurons(m, neurons, how)
    proto = export(m, exporter, opset, dynamic)
    return proto, compress(proto, m.d)


@pytest.mark.parametrize(("attention", "exporter", "opset", "dynamic"), EXPORTS)
def test_mlp_neurons_are_deleted_exactly(attention, exporter, opset, dynamic):
    proto, res = mlp_case(attention, exporter, opset, dynamic)
    dead = sum(len(n) for n in NEURONS.values())
    assert mlp_widths(proto, 32) == (64, 64)
    assert mlp_widths(res.model, 32) == (64 - dead,) * 2, res.report["blocked_by"]
    assert res.report["constant_channels_folded"] == len(NEURONS["constant"])


@pytest.mark.parametrize("gelu", ["tanh", "none"])
@pytest.mark.parametrize("opset", [14, 17])
def test_gelu_chains_pass_neurons(gelu, opset):
    """The Erf chain and the tanh approximation's Pow/Tanh/Mul chain, with constant neurons folded."""
    proto, res = mlp_case("separate", "legacy", opset, False, gelu)
    assert mlp_widths(res.model, 32) == (59, 59)
    assert res.report["constant_channels_folded"] == len(NEURONS["constant"])


def _ln_model(decomposed: bool) -> onnx.ModelProto:
    """x @ W (a zero column) -> LayerNorm -> @ W2: the zero feature is normalised with the others."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = 16
            self.a, self.n, self.b = nn.Linear(16, 24), nn.LayerNorm(24), nn.Linear(24, 8)

        def forward(self, x):
            return self.b(self.n(self.a(x)))
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        m.a.weight[3] = 0
        m.a.bias[3] = 0
    return export(m, "legacy", 14 if decomposed else 17)


@pytest.mark.parametrize("decomposed", [False, True])
def test_layernorm_is_a_wall_that_says_why(decomposed):
    proto = _ln_model(decomposed)
    res = compress(proto, 16)
    assert weights(res.model)[0] == (16, 24)
    reasons = " ".join(res.report["blocked_by"])
    assert "mean and variance" in reasons, res.report["blocked_by"]


# ---------------------------------------------------------------- part 2: attention heads

HEAD_EXPORTS = [  # (attention, exporter, opset, dynamic)
    pytest.param("separate", "legacy", 14, False, id="separate-legacy14"),
    pytest.param("separate", "legacy", 17, True, id="separate-legacy17-dynamic"),
    pytest.param("separate", "dynamo", 18, True, id="separate-dynamo-dynamic"),
    pytest.param("packed", "legacy", 17, False, id="packed-legacy17"),
    pytest.param("packed", "legacy", 18, True, id="packed-legacy18-dynamic"),
    pytest.param("packed", "dynamo", 18, True, id="packed-dynamo-dynamic"),
    pytest.param("packed-slices", "legacy", 17, True, id="packed-slices-legacy17-dynamic"),
    pytest.param("packed-slices", "dynamo", 18, False, id="packed-slices-dynamo"),
    pytest.param("sdpa", "legacy", 14, False, id="sdpa-legacy14"),
    pytest.param("sdpa", "legacy", 18, True, id="sdpa-legacy18-dynamic"),
    pytest.param("sdpa", "dynamo", 18, False, id="sdpa-dynamo"),
    pytest.param("sdpa", "dynamo", 18, True, id="sdpa-dynamo-dynamic"),
    pytest.param("causal-sdpa", "legacy", 17, True, id="causal-sdpa-legacy17-dynamic"),
    pytest.param("causal-sdpa", "dynamo", 18, True, id="causal-sdpa-dynamo-dynamic"),
    pytest.param("causal-separate", "legacy", 18, True, id="causal-masked-fill-legacy18-dynamic"),
    # nn.MultiheadAttention: packed in_proj split by Gather, heads through (S, B * H, Dh), out_proj a Gemm
    # on (S * B, D). Its legacy export bakes the batch into the graph: static only.
    pytest.param("mha", "legacy", 14, False, id="mha-legacy14"),
    pytest.param("mha", "legacy", 17, False, id="mha-legacy17"),
    pytest.param("mha", "legacy", 18, False, id="mha-legacy18"),
    pytest.param("mha", "dynamo", 18, False, id="mha-dynamo"),
    pytest.param("mha", "dynamo", 18, True, id="mha-dynamo-dynamic"),
    # At opset 23 the dynamo exporter writes ONNX Attention (4-D q, k, v) for both.
    pytest.param("sdpa", "dynamo", 23, True, id="sdpa-dynamo23-attention-op"),
    pytest.param("mha", "dynamo", 23, True, id="mha-dynamo23-attention-op"),
]

# Head 1 by its value rows and bias, head 3 by its output projection's columns; neuron 7 of the MLP too.
HEADS = {"rows": [1], "columns": [3]}


@functools.cache
def head_case(attention: str, exporter: str, opset: int, dynamic: bool, d: int = 32, h: int = 4):
    causal = attention.startswith("causal-")
    m = block(attention=attention.removeprefix("causal-"), d=d, h=h, causal=causal)
    for how, heads in HEADS.items():
        zero_heads(m, heads, how)
    zero_neurons(m, [7], "rows")
    proto = export(m, exporter, opset, dynamic)
    return proto, compress(proto, d)


def reshape_targets(model: onnx.ModelProto) -> list[list[int]]:
    """The constant entries of every Reshape target (initializer, Constant or Concat of constants)."""
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    made = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type != "Reshape":
            continue
        t = n.input[1]
        if t in consts:
            out.append([int(v) for v in consts[t].reshape(-1)])
        elif t in made and made[t].op_type == "Concat":
            out.append([int(v) for p in made[t].input if p in consts for v in consts[p].reshape(-1)])
    return out


@pytest.mark.parametrize(("attention", "exporter", "opset", "dynamic"), HEAD_EXPORTS)
def test_heads_are_deleted_exactly(attention, exporter, opset, dynamic):
    proto, res = head_case(attention, exporter, opset, dynamic)
    kept = 32 - 8 * sum(len(v) for v in HEADS.values())  # 2 of 4 heads of 8
    before, after = head_widths(proto), head_widths(res.model)
    packed = attention in ("packed", "packed-slices", "mha")
    assert before == ([96, 32] if packed else [32, 32, 32, 32]), before
    want = [3 * kept, kept] if packed else [kept] * 4
    assert after == want, (after, res.report["blocked_by"])
    assert mlp_widths(res.model, 32) == (63, 63)
    if opset >= 23:
        assert any(n.op_type == "Attention" for n in res.model.graph.node)
    targets = reshape_targets(res.model)
    assert not any(4 in t[-3:-1] for t in targets), targets  # no target names 4 heads any more
    assert any(2 in t[-3:-1] for t in targets), targets  # the split to heads names the 2 left
    assert res.report["blocked_by"] == {}, res.report["blocked_by"]


@pytest.mark.parametrize(("attention", "exporter", "opset", "dynamic"), [
    pytest.param("separate", "legacy", 17, True, id="separate-legacy17-dynamic"),
    pytest.param("sdpa", "legacy", 14, False, id="sdpa-legacy14"),
    pytest.param("sdpa", "dynamo", 18, True, id="sdpa-dynamo-dynamic"),
])
def test_a_head_with_zero_value_rows_and_a_bias_is_folded_and_deleted(attention, exporter, opset, dynamic):
    """P @ V of a softmax is the value bias for such a head: a constant, folded into the output
    projection's bias, after which no one needs the head."""
    m = block(attention=attention)
    zero_heads(m, [2], "constant")
    res = compress(export(m, exporter, opset, dynamic), 32)
    assert head_widths(res.model) == [24] * 4, res.report["blocked_by"]
    assert res.report["constant_channels_folded"] == 8  # the head's 8 features


# ---------------------------------------------------------------- property: random blocks and masks


@pytest.mark.parametrize("seed", range(8))
def test_random_blocks_lose_exactly_their_dead_neurons_and_heads(seed):
    rng = np.random.default_rng(seed)
    attention = ["separate", "packed", "sdpa", "mha"][seed % 4]
    h = int(rng.choice([2, 4]))
    d = h * int(rng.choice([8, 12, 16]))
    f = int(rng.choice([48, 64]))
    causal = attention != "mha" and bool(rng.integers(0, 2))  # a mask added (SDPA) or filled in (Where)
    m = block(seed, d=d, h=h, f=f, attention=attention, gelu=str(rng.choice(["none", "tanh"])), causal=causal)
    dead_heads = rng.choice(h, size=int(rng.integers(0, h)), replace=False)
    # Constant heads fold where q, k and v are apart; a packed projection keeps them (a wall, exact).
    hows = ["rows", "columns"] + (["constant"] if attention in ("separate", "sdpa") else [])
    for hd in dead_heads:
        zero_heads(m, [int(hd)], str(rng.choice(hows)))
    dead_neurons = rng.choice(f, size=int(rng.integers(0, 8)), replace=False)
    for n in dead_neurons:
        zero_neurons(m, [int(n)], str(rng.choice(["rows", "constant", "columns"])))
    dynamic = attention != "mha" and bool(rng.integers(0, 2))
    proto = export(m, "legacy", int(rng.choice([14, 17, 18])), dynamic, b=int(rng.integers(1, 3)), s=int(rng.integers(5, 18)))
    res = compress(proto, d)
    kept = (h - len(dead_heads)) * (d // h)
    packed = attention in ("packed", "mha")
    assert head_widths(res.model) == ([3 * kept, kept] if packed else [kept] * 4), res.report["blocked_by"]
    assert mlp_widths(res.model, d) == (f - len(dead_neurons),) * 2, res.report["blocked_by"]


# ---------------------------------------------------------------- MACs


def block_macs(s: int, d: int, f: int, width: int, hidden: int) -> int:
    """Per sample: q, k, v projections to ``width`` (heads x Dh kept), Q @ K^T and P @ V, the output
    projection, the MLP's two layers through ``hidden`` neurons."""
    return s * d * 3 * width + 2 * s * s * width + s * width * d + 2 * s * d * hidden


@pytest.mark.parametrize("attention", ["separate", "mha"])
def test_macs_count_every_row_and_the_attention_at_any_batch(attention):
    """A static export and a dynamic one (batch and sequence) count the same MACs per sample: the
    sequence length verification ran (13), not 1; (S, B, D) layouts count S rows, not B."""
    s = 13  # feeds(..., seed=2) runs the dynamic export at this length
    totals = []
    for dynamic in ([False, True] if attention != "mha" else [False]):
        m = block(attention=attention)
        zero_heads(m, [1], "rows")
        zero_neurons(m, [7, 9], "rows")
        res = compress(export(m, "legacy", 17, dynamic, b=1, s=s), 32)
        totals.append((res.report["totals"]["macs"], res.report["totals"]["macs_after"]))
    assert totals[0] == (block_macs(s, 32, 64, 32, 64), block_macs(s, 32, 64, 24, 62))
    assert len(set(totals)) == 1, totals


# ---------------------------------------------------------------- part 3: fused attention ops

B_, S_, D_, H_ = 2, 7, 32, 4
DH_ = D_ // H_


def _fused(op: str, *, domain: str = "com.microsoft", opset: int = 17, four_d: bool = False, gqa: bool = False,
           past: bool = False, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> projections -> the fused op -> output projection (MatMul + bias) -> y, with head 1 dead by its
    value columns and bias, head 2 a constant (value columns zero, bias kept), head 3 dead by the output
    projection's rows. Returns the model and its weights by name."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = {k: rng.standard_normal(s).astype(np.float32) * 0.3
         for k, s in [("wq", (D_, D_)), ("wk", (D_, D_)), ("wv", (D_, D_)), ("wo", (D_, D_)), ("bo", (D_,)),
                      ("wqkv", (D_, 3 * D_)), ("bqkv", (3 * D_,))]}

    def head(h):
        return slice(h * DH_, (h + 1) * DH_)
    for k in ("wv",):
        w[k][:, head(1)] = 0
        w[k][:, head(2)] = 0
    w["wqkv"][:, 2 * D_:][:, head(1)] = 0
    w["wqkv"][:, 2 * D_:][:, head(2)] = 0
    w["bqkv"][2 * D_:][head(1)] = 0
    w["wo"][head(3)] = 0
    nodes = []
    if op == "Attention" and domain == "com.microsoft":
        ins = ["x", "wqkv", "bqkv"] + (["", "past"] if past else [])
        nodes.append(helper.make_node("Attention", ins, ["a"] + (["present"] if past else []), domain=domain,
                                      num_heads=H_))
    else:
        for p in "qkv":
            nodes.append(helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}2"]))
        if op == "MultiHeadAttention":
            nodes.append(helper.make_node("MultiHeadAttention", ["q2", "k2", "v2", "bqkv"], ["a"], domain=domain,
                                          num_heads=H_))
        elif four_d:
            for p in "qkv":
                nodes.append(helper.make_node("Reshape", [f"{p}2", "heads"], [f"{p}3"]))
                nodes.append(helper.make_node("Transpose", [f"{p}3"], [f"{p}4"], perm=[0, 2, 1, 3]))
            nodes.append(helper.make_node("Attention", ["q4", "k4", "v4"], ["a4"]))
            nodes.append(helper.make_node("Transpose", ["a4"], ["a3"], perm=[0, 2, 1, 3]))
            nodes.append(helper.make_node("Reshape", ["a3", "width"], ["a"]))
        else:
            kv = H_ // 2 if gqa else H_
            if gqa:
                for p in "kv":
                    w[f"w{p}"] = w[f"w{p}"][:, :kv * DH_].copy()
            nodes.append(helper.make_node("Attention", ["q2", "k2", "v2"], ["a"], q_num_heads=H_, kv_num_heads=kv))
    nodes += [helper.make_node("MatMul", ["a", "wo"], ["o"]), helper.make_node("Add", ["o", "bo"], ["y"])]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.array([0, 0, H_, DH_], np.int64), "heads"),
              numpy_helper.from_array(np.array([0, 0, D_], np.int64), "width")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", S_, D_])]
    if past:
        inputs.append(helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, "batch", H_, 3, DH_]))
    graph = helper.make_graph(nodes, "fused", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", S_, D_])],
                              inits)
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    return model, w


def _compress_fused(proto: onnx.ModelProto):
    feeds_ = [{i.name: np.random.default_rng(k).standard_normal(
        [B_ if j == 0 else (d.dim_value or 2) for j, d in enumerate(i.type.tensor_type.shape.dim)]).astype(np.float32)
        for i in proto.graph.input} for k in range(2)]
    res = sslcompress.compress(proto, inputs=feeds_[:1], shape_lowering="off")
    assert res.verification.passed, res.report["verification"]
    for feed in feeds_:
        want, got = run(proto, feed), run(res.model, feed)
        scale, diff = float(np.max(np.abs(want["y"]))), float(np.max(np.abs(want["y"] - got["y"])))
        assert diff <= RTOL * scale, (diff, scale)
    return res


def _attr(model: onnx.ModelProto, op: str, name: str) -> int:
    node = next(n for n in model.graph.node if n.op_type == op)
    return next(a.i for a in node.attribute if a.name == name)


@pytest.mark.parametrize(("op", "domain", "opset", "four_d"), [
    pytest.param("Attention", "com.microsoft", 17, False, id="contrib-attention"),
    pytest.param("MultiHeadAttention", "com.microsoft", 17, False, id="contrib-multiheadattention"),
    pytest.param("Attention", "", 23, False, id="onnx-attention-3d"),
    pytest.param("Attention", "", 23, True, id="onnx-attention-4d"),
])
def test_fused_attention_ops_lose_their_dead_heads(op, domain, opset, four_d):
    proto, _ = _fused(op, domain=domain, opset=opset, four_d=four_d)
    res = _compress_fused(proto)
    shapes = weights(res.model)
    assert shapes[-1] == (DH_, D_), (shapes, res.report["blocked_by"])  # the output projection reads head 0 only
    if op == "Attention" and domain:
        assert shapes == [(DH_, D_)] and _attr(res.model, "Attention", "num_heads") == 1
        node = next(n for n in res.model.graph.node if n.op_type == "Attention")
        dims = {i.name: tuple(i.dims) for i in res.model.graph.initializer}
        assert dims[node.input[1]] == (D_, 3 * DH_) and dims[node.input[2]] == (3 * DH_,)
    else:
        assert shapes[:3] == [(D_, DH_)] * 3, shapes
        if not four_d:
            for a in (["num_heads"] if domain else ["q_num_heads", "kv_num_heads"]):
                assert _attr(res.model, op, a) == 1
        else:
            assert [0, 0, 1, DH_] in reshape_targets(res.model)
    if domain:  # head 2: value bias kept, its constant output folded into the output projection's bias
        assert res.report["constant_channels_folded"] == 8  # the head's 8 features


def test_onnx_attention_with_grouped_query_heads_loses_a_dead_group():
    # Two key/value heads for four query heads: key/value head 1 (zero values, no bias) serves query heads 2
    # and 3, whose outputs are then zero; the group goes whole and both head counts follow.
    proto, _ = _fused("Attention", domain="", opset=23, gqa=True)
    res = _compress_fused(proto)
    assert weights(res.model) == [(D_, 2 * DH_), (D_, DH_), (D_, DH_), (2 * DH_, D_)], res.report["blocked_by"]
    assert (_attr(res.model, "Attention", "q_num_heads"), _attr(res.model, "Attention", "kv_num_heads")) == (2, 1)


@pytest.mark.parametrize(("kw", "why"), [
    pytest.param({"op": "Attention", "past": True}, "past key/value", id="contrib-past"),
])
def test_fused_attention_walls_say_why(kw, why):
    proto, _ = _fused(**kw)
    res = _compress_fused(proto)
    assert any(why in k for k in res.report["blocked_by"]), res.report["blocked_by"]


class TokenMLP(nn.Module):
    """The MLP on (B * S, D) rows: the legacy exporter writes its Linears as Gemm with transB."""

    def __init__(self, d: int = 32, f: int = 64) -> None:
        super().__init__()
        self.d, self.fc1, self.fc2 = d, nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        b, s, d = x.shape
        return self.fc2(F.gelu(self.fc1(x.reshape(b * s, d)))).reshape(b, s, d)


@pytest.mark.parametrize("dynamic", [False, True])
def test_gemm_mlp_neurons_are_deleted_exactly(dynamic):
    torch.manual_seed(0)
    m = TokenMLP().eval()
    for how, neurons in NEURONS.items():
        zero_neurons(m, neurons, how)
    proto = export(m, "legacy", 17, dynamic)
    assert [n.op_type for n in proto.graph.node].count("Gemm") == 2
    res = compress(proto, 32)
    dead = sum(len(n) for n in NEURONS.values())
    assert mlp_widths(res.model, 32) == (64 - dead,) * 2, res.report["blocked_by"]
    assert res.report["constant_channels_folded"] == len(NEURONS["constant"])


@pytest.mark.parametrize(("op", "domain", "opset", "four_d", "projection"), [
    pytest.param("Attention", "com.microsoft", 17, False, True, id="contrib-attention"),
    pytest.param("MultiHeadAttention", "com.microsoft", 17, False, False, id="contrib-multiheadattention"),
    pytest.param("Attention", "", 23, False, False, id="onnx-attention-3d"),
    pytest.param("Attention", "", 23, True, False, id="onnx-attention-4d"),
])
def test_fused_attention_ops_count_their_macs(op, domain, opset, four_d, projection):
    """A fused attention counts its Q @ K^T and P @ V per head (and the packed projection where it holds
    one), before and after its dead heads go: one of the four heads is left."""
    proto, _ = _fused(op, domain=domain, opset=opset, four_d=four_d)
    res = _compress_fused(proto)
    row = next(r for r in res.report["layers"] if r["op"] == op)
    products = S_ * S_ * 2 * DH_  # per head: S x S scores of DH_ each, and S x DH_ outputs of S each
    want = H_ * products + (S_ * D_ * 3 * D_ if projection else 0)
    want_after = products + (S_ * D_ * 3 * DH_ if projection else 0)
    assert (row["macs"], row["macs_after"]) == (want, want_after), row
