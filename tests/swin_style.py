"""A Swin written as transformers and timm write theirs: windows of tokens folded into the batch axis, an
attention per window with a learned relative position bias per head (a table indexed by a buffer, viewed to
(tokens, tokens, heads) and permuted to (heads, tokens, tokens)), and in every second block windows shifted by a
roll, with a mask per window added to the scores in a (batch, windows, heads, tokens, tokens) view."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, dim // heads
        self.all_head_size = heads * self.attention_head_size
        self.window_size = (window, window)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_position_index(window), persistent=False)
        self.query, self.key, self.value = (nn.Linear(dim, self.all_head_size) for _ in range(3))
        self.dense = nn.Linear(self.all_head_size, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).contiguous()
        scores = scores + bias.unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            scores = scores.view(b // windows, windows, self.num_attention_heads, n, n)
            scores = (scores + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_attention_heads, n, n)
        context = torch.matmul(F.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        return self.dense(context.view(context.size()[:-2] + (self.all_head_size,)))


def _shift_mask(side: int, window: int, shift: int) -> torch.Tensor:
    """-100 where two tokens of a shifted window came from different regions (Swin's mask), per window."""
    region = torch.zeros(side, side)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in cuts:
        for cols in cuts:
            region[rows, cols] = label
            label += 1
    windows = region.view(side // window, window, side // window, window).permute(0, 2, 1, 3).reshape(-1, window ** 2)
    return (windows[:, None, :] != windows[:, :, None]).float() * -100.0


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, side: int, window: int, shift: int):
        super().__init__()
        self.side, self.window, self.shift = side, window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = WindowAttention(dim, heads, window)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.register_buffer("attn_mask", _shift_mask(side, window, shift) if shift else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, side * side, dim)
        b, _, c = x.shape
        s, w = self.side, self.window
        y = self.norm1(x).view(b, s, s, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = y.view(b, s // w, w, s // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
        y = self.attention(y, self.attn_mask)
        y = y.view(b, s // w, s // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, s, s, c)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, s * s, c)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SwinStyle(nn.Module):
    """4x4 patches of a 32x32 image (8x8 tokens), windows of 4x4, plain and shifted blocks in turn (the two
    shifted ones export the same view targets, which each cut rewrites for its own heads)."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(*(SwinBlock(dim, heads, 8, 4, 2 * (b % 2)) for b in range(4)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(1))
