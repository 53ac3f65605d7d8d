"""A small ViT whose attention is written as Hugging Face's transformers (5.x) writes its ViT's: heads viewed
with -1 and merged back with -1 (`view(*input_shape, -1, head_dim)`, `reshape(*input_shape, -1)`), the head
count in `num_attention_heads`, a mask the same for every head, and either the eager path (softmax in float32,
cast back with `.to(q.dtype)`) or the sdpa one (scaled_dot_product_attention with a boolean mask, its output
reshaped to its own shape). Unpacking a shape, its forward is no fx graph: the analysis reads torch.export's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HfStyleAttention(nn.Module):
    def __init__(self, dim: int, heads: int, sdpa: bool):
        super().__init__()
        self.num_attention_heads = heads
        self.head_dim = dim // heads
        self.scaling = self.head_dim ** -0.5
        self.sdpa = sdpa
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        input_shape = x.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(x).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(x).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(x).view(hidden_shape).transpose(1, 2)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
            out = out.reshape(out.shape[0], -1, out.shape[2], out.shape[3])
        else:
            w = torch.matmul(q, k.transpose(2, 3)) * self.scaling
            w = w + torch.zeros_like(mask, dtype=w.dtype).masked_fill(~mask, float("-inf"))
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            w = F.dropout(w, p=0.0, training=self.training)
            out = torch.matmul(w, v)
        out = out.transpose(1, 2).contiguous()
        return self.o_proj(out.reshape(*input_shape, -1))


class HfStyleBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, sdpa: bool):
        super().__init__()
        self.layernorm_before, self.layernorm_after = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = HfStyleAttention(dim, heads, sdpa)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.layernorm_after(x))))


class HfStyleVit(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image: int = 8, patch: int = 4, dim: int = 24,
                 heads: int = 4, depth: int = 2, sdpa: bool = False):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        tokens = (image // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position_embeddings = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.layers = nn.ModuleList(HfStyleBlock(dim, heads, 2 * dim, sdpa) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embeddings
        n = x.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device)[None, None]  # every token sees every token
        for layer in self.layers:
            x = layer(x, mask)
        return self.classifier(self.norm(x)[:, 0])
