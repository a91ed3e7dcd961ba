"""A fairseq-style decoder-only Transformer language model (Vaswani 2017; Baevski & Auli
2019 setting without adaptive input): token embedding scaled by sqrt(d), sinusoidal
positions, pre-norm blocks with causal self-attention (q/k/v/out projections as separate
Linear layers named like fairseq's ``self_attn.{q,k,v,out}_proj``) and an FFN
(``fc1``/``fc2``), output projection tied to the embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.errors import ConfigError


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.dim={dim} must be divisible by model.heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, heads, dropout)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x)))
        h = self.fc2(self.dropout(F.relu(self.fc1(self.final_layer_norm(x)))))
        return x + self.dropout(h)


class TransformerLM(nn.Module):
    def __init__(
        self, vocab_size: int, dim: int = 512, layers: int = 6, heads: int = 8,
        ffn_dim: int = 2048, dropout: float = 0.1, max_len: int = 1024, tie: bool = True,
        tiny: bool = False,
    ) -> None:
        super().__init__()
        if tiny:
            dim, layers, heads, ffn_dim = 32, 2, 2, 64
        self.dim = dim
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed_tokens.weight, std=dim**-0.5)
        pos = torch.arange(max_len).unsqueeze(1)
        inv = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(max_len, dim)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * inv), torch.cos(pos * inv)
        self.register_buffer("positions", pe, persistent=False)
        self.layers = nn.ModuleList(Block(dim, heads, ffn_dim, dropout) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.output_projection = nn.Linear(dim, vocab_size, bias=False)
        if tie:
            self.output_projection.weight = self.embed_tokens.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.positions.shape[0]:
            raise ConfigError(f"sequence length {t} > model.max_len={self.positions.shape[0]}")
        x = self.embed_tokens(tokens) * math.sqrt(self.dim) + self.positions[:t]
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x)
        return self.output_projection(self.layer_norm(x))
