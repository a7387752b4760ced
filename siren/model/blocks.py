"""Transformer pieces shared by the backbone F_k and the residual decoder R_k.

Pre-norm blocks (RMSNorm), attention through ``F.scaled_dot_product_attention``. The official
code (wjc2830/Siren) uses a SwiGLU MLP of hidden 2816 at d = 1024, biases on cross-attention
only, dropout on the attention probabilities and the MLP output; Table 2's per-layer sizes
follow: self-attn 4d^2 + SwiGLU 3 * 2816 * d = 12.85M for a decoder layer, plus
cross-attention q/o d^2 + d each and k/v 768 * 2d + 2d = 16.52M for a backbone layer
(14 x 16.52M = Table 2's "Main Para. 231M"). ``mlp=gelu`` (4d) and ``block_order=self_first``
keep the harness's first reading of the paper. Self-attention keeps a KV cache for sampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_positions(start: int, length: int, dim: int, device=None) -> torch.Tensor:
    """Fixed sin/cos position codes for positions [start, start+length) -> [length, dim] (float32)."""
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe


class KVCache:
    """Keys/values of the positions seen so far, for one attention layer; grows by doubling."""

    def __init__(self):
        self.k = self.v = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, H, n, hd] for the n new positions -> all keys/values so far (inference only)."""
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            cap = max(64, 2 * end)
            new_k = k.new_empty(*k.shape[:2], cap, k.shape[3])
            new_v = v.new_empty(*v.shape[:2], cap, v.shape[3])
            if self.length:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length: end] = k
        self.v[:, :, self.length: end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self):
        self.length = 0


@dataclass
class TextKV:
    """Cross-attention keys/values of the text token states for one block, with the padding mask."""
    k: torch.Tensor  # [B, H, L, hd]
    v: torch.Tensor  # [B, H, L, hd]
    mask: torch.Tensor  # [B, 1, 1, L] additive: 0 for real tokens, -inf for padding


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Causal attention of x [B, T, d] over itself and, with a cache, the cached past."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
        p = self.dropout if self.training else 0.0  # on the attention probabilities, as the official code
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=p)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # T new queries at positions past..past+T-1 see keys <= their own position
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class CrossAttention(nn.Module):
    """Queries from the audio stream, keys/values from the 768-d CLAP text token states."""

    def __init__(self, dim: int, heads: int, text_dim: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(text_dim, 2 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def text_kv(self, text: torch.Tensor, text_mask: torch.Tensor) -> TextKV:
        B, L, _ = text.shape
        d = self.q.out_features
        k, v = self.kv(text).view(B, L, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = torch.zeros(text_mask.shape, dtype=k.dtype, device=k.device)
        bias = bias.masked_fill(~text_mask.bool(), float("-inf"))
        return TextKV(k, v, bias[:, None, None, :])

    def forward(self, x: torch.Tensor, text: TextKV) -> torch.Tensor:
        B, T, d = x.shape
        q = self.q(x).view(B, T, self.heads, d // self.heads).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, text.k, text.v, attn_mask=text.mask, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    """``swiglu``: down(silu(gate(x)) * up(x)) (official); ``gelu``: down(gelu(up(x))). No biases."""

    def __init__(self, dim: int, hidden: int, kind: str = "swiglu", dropout: float = 0.0):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False) if kind == "swiglu" else None
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)  # on the MLP output, as the official code

    def forward(self, x):
        u = self.up(x)
        return self.drop(self.down(F.gelu(u) if self.gate is None else F.silu(self.gate(x)) * u))


class Block(nn.Module):
    """Pre-norm block: [cross-attn to text], causal self-attn, MLP (``cross_first``, official) or
    self-attn, [cross-attn], MLP (``cross_first=False``)."""

    def __init__(self, cfg, text_dim: int | None = None):
        """``cfg``: a ModelConfig (dim, attn_heads, mlp, dropout, cross_attn_bias, block_order, norm_eps)."""
        super().__init__()
        d, eps = cfg.dim, cfg.norm_eps or None  # norm_eps 0: torch's default (the dtype's machine epsilon)
        self.cross_first = cfg.block_order == "cross_first"
        self.norm_self = nn.RMSNorm(d, eps=eps)
        self.self_attn = SelfAttention(d, cfg.attn_heads, cfg.dropout)
        if text_dim is not None:
            self.norm_cross = nn.RMSNorm(d, eps=eps)
            self.cross_attn = CrossAttention(d, cfg.attn_heads, text_dim, cfg.cross_attn_bias, cfg.dropout)
        else:
            self.cross_attn = None
        self.norm_mlp = nn.RMSNorm(d, eps=eps)
        self.mlp = MLP(d, cfg.mlp_hidden_size, cfg.mlp, cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, text: TextKV | None = None) -> torch.Tensor:
        cross = self.cross_attn is not None
        if cross and self.cross_first:
            x = x + self.cross_attn(self.norm_cross(x), text)
        x = x + self.self_attn(self.norm_self(x), cache)
        if cross and not self.cross_first:
            x = x + self.cross_attn(self.norm_cross(x), text)
        return x + self.mlp(self.norm_mlp(x))
