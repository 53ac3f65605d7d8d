"""A small Vision Transformer for CIFAR-sized inputs, with attention written out; and the same layout with
LLaMA's blocks (RMSNorm, no biases, grouped-query attention with rotary position embeddings, a SwiGLU MLP).

Pre-norm blocks (LayerNorm, multi-head self-attention, residual, LayerNorm, Linear-GELU-Linear,
residual), a class token and a learned position embedding. Attention uses separate q, k and v Linears
and an explicit softmax(q k^T / sqrt(d)) v, so every weight an attention head owns is a slice of a
Linear a structure analysis can see, and its MatMuls are ops an ONNX export keeps as they are.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ._init import init_transformer_weights


def patch_size_for(input_size: tuple[int, int]) -> int:
    """A patch size that divides both sides and leaves about 8 patches a side (4 below 16 pixels): 4 for
    32x32 CIFAR and 28x28 digits, 2 for 8x8; tokens enough to attend over, few enough to train on a CPU."""
    h, w = input_size
    side, target = min(h, w), (8 if min(h, w) >= 16 else 4)
    divisors = [p for p in range(1, side + 1) if h % p == 0 and w % p == 0]
    return min(divisors, key=lambda p: (abs(side / p - target), -p))


class Attention(nn.Module):
    """Multi-head self-attention on (batch, tokens, dim) with separate q, k, v projections."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The two halves of each head's features swapped, the second negated: LLaMA's rotation partner."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, tokens, head_dim) -> (batch, kv_heads * n_rep, tokens, head_dim), each key/value head
    repeated for the n_rep query heads that share it (Hugging Face's LLaMA writes it so)."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class LlamaAttention(nn.Module):
    """LLaMA's attention on (batch, tokens, dim): no biases, fewer key/value heads than query heads (grouped-query
    attention), queries and keys rotated by their token's position (rotary embeddings, base 10000)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, tokens: int) -> None:
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} is not {num_heads} heads of an even width in groups of {num_kv_heads}")
        self.num_heads, self.num_key_value_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        angles = torch.outer(torch.arange(tokens).float(), inv_freq)
        emb = torch.cat((angles, angles), dim=-1)  # (tokens, head_dim): the same for every head
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        q = q * self.cos + rotate_half(q) * self.sin
        k = k * self.cos + rotate_half(k) * self.sin
        n_rep = self.num_heads // self.num_key_value_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class Mlp(nn.Module):
    """The block's Linear-GELU-Linear: each hidden unit is one row of fc1 and one column of fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMlp(nn.Module):
    """LLaMA's SwiGLU MLP, down(silu(gate(x)) * up(x)), without biases: hidden unit j is row j of gate and of up
    and column j of down."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def gated_hidden(dim: int, mlp_ratio: int) -> int:
    """LLaMA's hidden width: two thirds of mlp_ratio x dim (the same parameters as a plain MLP of that ratio),
    rounded up to a multiple of 8."""
    return -(-2 * mlp_ratio * dim // 3 // 8) * 8


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, llama: bool = False, kv_heads: int = 0,
                 tokens: int = 0) -> None:
        super().__init__()
        norm = nn.RMSNorm if llama else nn.LayerNorm
        self.norm1 = norm(dim)
        self.attn = LlamaAttention(dim, num_heads, kv_heads or num_heads, tokens) if llama else Attention(dim, num_heads)
        self.norm2 = norm(dim)
        self.mlp = GatedMlp(dim, gated_hidden(dim, mlp_ratio)) if llama else Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding, class token, position embedding, pre-norm blocks, final norm, head on the class token."""

    def __init__(self, num_classes: int, in_channels: int, input_size: tuple[int, int], *, dim: int = 96,
                 depth: int = 6, num_heads: int = 3, mlp_ratio: int = 4, patch: int | None = None,
                 llama: bool = False, kv_heads: int = 0) -> None:
        super().__init__()
        patch = patch or patch_size_for(input_size)
        tokens = (input_size[0] // patch) * (input_size[1] // patch)
        if tokens < 1 or input_size[0] % patch or input_size[1] % patch:
            raise ValueError(f"a {input_size[0]}x{input_size[1]} input is not tiled by {patch}x{patch} patches")
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # LLaMA's blocks place tokens by rotating queries and keys: no position embedding added.
        self.pos_embed = None if llama else nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, llama, kv_heads, tokens + 1)
                                      for _ in range(depth)])
        self.norm = nn.RMSNorm(dim) if llama else nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        init_transformer_weights(self, tuple(p for p in (self.cls_token, self.pos_embed) if p is not None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    return VisionTransformer(num_classes, in_channels, input_size)


def llama_vit_tiny(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """vit_tiny's width and depth with LLaMA's blocks: RMSNorm, attention and MLP without biases, 4 query heads of
    24 sharing 2 key/value heads (grouped-query attention), rotary position embeddings instead of a learned
    position embedding, a SwiGLU MLP of 256 hidden units (two thirds of 4x, the same parameters as vit_tiny's
    MLP)."""
    if not hasattr(nn, "RMSNorm"):
        raise UnsupportedModelError("llama_vit_tiny needs torch 2.4 or later (nn.RMSNorm)")
    return VisionTransformer(num_classes, in_channels, input_size, num_heads=4, llama=True, kv_heads=2)


def vit_small(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """ViT-S/16's layout (384 wide, 12 blocks of 6 heads, MLP 4x, 16x16 patches: 22.05M parameters with
    1000 classes), attention written out as in vit_tiny; random weights unless a checkpoint is given."""
    return VisionTransformer(num_classes, in_channels, input_size, dim=384, depth=12, num_heads=6, patch=16)
