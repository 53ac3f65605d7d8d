"""LLaMA-style blocks: RMSNorm, causal attention, and a gated MLP, ``down(silu(gate(x)) * up(x))``. Hidden unit j
of the product is unit j of both factors: one neuron group owns row j of gate and of up and column j of down,
the training counts what the export cuts, and the MLP branch is a depth group. The same with gate and up packed
in one Linear and chunked along the features (``w12(x).chunk(2, -1)``): unit j owns rows j and hidden + j."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from counted_cut import assert_cut_as_counted, assert_thinned_exactly, exported
from torch import nn
from zeroing import zero_groups

from sslcompress.finetune.groups import build_groups
from sslcompress.models.vit import GatedMlp
from sslcompress.surgery.export import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 1, 8, 8)  # 16 patch tokens of 2x2
DIM, HIDDEN = 16, 24


class PackedGatedMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int = 2, packed: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.mlp = (PackedGatedMlp if packed else GatedMlp)(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        y = self.norm1(x)
        q, k, v = (m(y).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyLlama(nn.Module):
    def __init__(self, packed: bool = False) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, DIM, 2, 2)
        self.blocks = nn.Sequential(Block(DIM, HIDDEN, packed=packed), Block(DIM, HIDDEN, packed=packed))
        self.norm = nn.RMSNorm(DIM)
        self.head = nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


def _model(packed: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = TinyLlama(packed).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    return model


def _zero(model: nn.Module, groups) -> None:
    zero_groups(model, groups)


@pytest.mark.parametrize("packed", [False, True], ids=["gate-up", "packed"])
def test_a_gated_mlp_unit_is_one_neuron_of_gate_up_and_down(packed):
    groups = build_groups(_model(packed), SHAPE, ("neuron", "depth"))
    neurons = [g for g in groups if g.kind == "neuron"]
    assert len(neurons) == 2 * HIDDEN and all(g.removable for g in neurons)
    third = {(s.param, s.axis, tuple(s.index)) for s in neurons[2].slices}
    if packed:
        assert third == {("blocks.0.mlp.w12.weight", "out", (2, HIDDEN + 2)), ("blocks.0.mlp.down.weight", "in", (2,))}
    else:
        assert third == {("blocks.0.mlp.gate.weight", "out", (2,)), ("blocks.0.mlp.up.weight", "out", (2,)),
                         ("blocks.0.mlp.down.weight", "in", (2,))}
    # The MLP branch (its RMSNorm, the three Linears and the product) is a depth group, and so is the attention
    # branch (its output projection zero, it adds zero).
    assert [g.name for g in groups if g.kind == "depth"] == [
        "depth blocks.0[norm1,q,k,v,o]", "depth blocks.0[norm2,mlp]", "depth blocks.1[norm1,q,k,v,o]",
        "depth blocks.1[norm2,mlp]"]


@pytest.mark.parametrize("packed", [False, True], ids=["gate-up", "packed"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@torch.no_grad()
def test_zero_units_and_a_zero_branch_are_counted_as_the_export_cuts_them(exporter, packed):
    model = _model(packed)
    groups = build_groups(model, SHAPE, ("neuron", "depth"))
    _zero(model, [g for g in groups if g.kind == "neuron" and g.name.startswith("neuron blocks.0.")][::2])
    _zero(model, [g for g in groups if g.name == "depth blocks.1[norm2,mlp]"])
    result, counted = assert_cut_as_counted(model, SHAPE, exported(model, SHAPE, exporter))
    assert counted.blocks_removed == ("blocks.1[norm2,mlp]",) and len(result.report["blocks_removed"]) == 1
    # Block 0's gate and up keep 12 of 24 units (packed: 24 of 48 rows).
    widths = {tuple(init.dims) for init in result.model.graph.initializer}
    kept = HIDDEN if packed else HIDDEN // 2
    assert (DIM, kept) in widths or (kept, DIM) in widths


@pytest.mark.parametrize("packed", [False, True], ids=["gate-up", "packed"])
def test_thinning_zero_units_keeps_the_outputs(packed):
    model = _model(packed)
    neurons = [g for g in build_groups(model, SHAPE, ("neuron",)) if g.removable]
    _zero(model, neurons[::3])
    assert_thinned_exactly(model, SHAPE)
    left = HIDDEN - len(range(0, HIDDEN, 3))
    mlp = model.blocks[0].mlp
    assert mlp.down.in_features == left
    assert (mlp.w12.out_features == 2 * left) if packed else (mlp.gate.out_features == mlp.up.out_features == left)


def test_the_export_of_a_causal_model_writes_nothing_to_the_terminal(capfd):
    # onnxsim's constant folding writes a warning from C++ for each node it cannot fold (the causal mask's
    # Equal and Where): noise on the user's terminal.
    export_onnx(_model(), SHAPE)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


class GluNet(nn.Module):
    """F.glu on tokens (a GLU MLP: w12's first half times the sigmoid of its second) and nn.GLU over a gated
    conv's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2 * 8, 3, padding=1)
        self.glu = nn.GLU(dim=1)
        self.conv2 = nn.Conv2d(8, DIM, 2, 2)
        self.w12 = nn.Linear(DIM, 2 * HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.head = nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.glu(self.conv1(x))).flatten(2).transpose(1, 2)
        x = x + self.down(F.glu(self.w12(x), dim=-1))
        return self.head(x.mean(1))


@torch.no_grad()
def test_a_glu_unit_is_its_two_halves_on_tokens_and_on_channels():
    torch.manual_seed(0)
    model = GluNet().eval()
    neurons = [g for g in build_groups(model, SHAPE, ("neuron",)) if g.removable]
    assert len(neurons) == HIDDEN
    assert {(s.param, s.axis, tuple(s.index)) for s in neurons[1].slices} >= {
        ("w12.weight", "out", (1, HIDDEN + 1)), ("down.weight", "in", (1,))}
    filters = {g.name: g for g in build_groups(model, SHAPE, ("filter",)) if g.removable}
    conv1 = [g for g in filters.values() if any(s.param == "conv1.weight" for s in g.slices)]
    assert len(conv1) == 8 and {tuple(s.index) for s in conv1[2].slices if s.param == "conv1.weight"} == {(2, 10)}
    # The MLP branch (w12, the GLU, down) is a depth group.
    (depth,) = build_groups(model, SHAPE, ("depth",))
    assert {s.param for s in depth.slices} == {"w12.weight", "w12.bias", "down.weight", "down.bias"}
    zero_groups(model, neurons[::2] + conv1[::3])
    assert_cut_as_counted(model, SHAPE, exported(model, SHAPE))


def test_thinning_zero_glu_units_keeps_the_outputs():
    torch.manual_seed(0)
    model = GluNet().eval()
    neurons = [g for g in build_groups(model, SHAPE, ("neuron",)) if g.removable]
    conv1 = [g for g in build_groups(model, SHAPE, ("filter",))
             if g.removable and any(s.param == "conv1.weight" for s in g.slices)]
    zero_groups(model, neurons[::2] + conv1[::3])
    assert_thinned_exactly(model, SHAPE)
    assert (model.w12.out_features, model.down.in_features) == (HIDDEN, HIDDEN // 2)
    assert (model.conv1.out_channels, model.conv2.in_channels) == (2 * 5, 5)
