"""A tiny causal transformer language model, written as a user would: plain modules only.

Factory signature (what ``model: {python: tiny_lm.py:build}`` calls): lighten passes the language
model task's ``vocab_size`` and ``seq_len`` (from the ``text`` data) plus the recipe's
``model.kwargs``. The model maps token ids ``(B, T)`` int64 to next-token logits ``(B, T, V)``.

Attention is q/k/v/out ``nn.Linear`` layers with a ``num_heads`` attribute (prune.heads finds
and slices them; quant.dynamic quantizes every Linear). The forward reads the head count from
the q layer's width (``head_dim`` is fixed), so a model whose heads were removed runs from its
layer shapes alone; the causal mask is built from ``arange`` of the input length, so torch.fx
traces the model (quant.ptq, structured pruning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        d = self.head_dim

        def heads(y: torch.Tensor) -> torch.Tensor:  # (B, T, h*d) -> (B, h, T, d)
            return y.reshape(b, t, -1, d).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-2, -1) / (d ** 0.5)  # (B, h, T, T)
        pos = torch.arange(t, device=x.device)
        causal = pos[:, None] >= pos[None, :]  # (T, T): a position sees itself and the past
        scores = scores.masked_fill(~causal, float("-inf"))
        y = F.softmax(scores, dim=-1) @ v  # (B, h, T, d)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, dim: int = 64, num_heads: int = 4,
                 layers: int = 2, hidden: int = 128):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.Sequential(*(Block(dim, num_heads, hidden) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)  # (B, T, C)
        return self.head(self.ln(self.blocks(x)))  # (B, T, V)


def build(vocab_size: int, seq_len: int, **kwargs) -> nn.Module:
    """``vocab_size`` and ``seq_len`` come from the data; ``kwargs`` (dim, num_heads, layers,
    hidden) from the recipe's ``model.kwargs``."""
    return TinyLM(vocab_size, seq_len, **kwargs)
