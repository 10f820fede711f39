"""Building blocks of the Gemma transformer: RMSNorm, rotary embedding, attention, GeGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm with a zero-centred weight: y = x / rms(x) * (1 + w), computed in f32, rounded once."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, f32, [B, T, head_dim / 2]; positions: [B, T] integers.

    Angles are pos * inv_freq in f32, as in gemma_pytorch and transformers; `scaling` divides the frequencies
    (linear RoPE scaling of Gemma 3's global layers).
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents) / scaling
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [B, H, T, hd] in the half-split layout: pairs (i, i + hd/2). Computed in f32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, hd/2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class Attention(nn.Module):
    """Multi-query, grouped-query or multi-head attention, with optional QK-norm and score soft-capping."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, scale: float,
                 softcap: float | None = None, qk_norm: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale, self.softcap = scale, softcap
        self.q = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                kv_write=None) -> torch.Tensor:
        """x: [B, T, D]; mask: [B, 1, T, S] bool (True = may attend), or None for causal over T = S keys. `kv_write(k, v)` stores this
        step's keys and values in a cache and returns all S of them."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, T, hd]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, KV, T, hd]
        if kv_write is not None:
            k, v = kv_write(k, v)  # [B, KV, S, hd]
        # The query heads sharing a key/value head are folded into the query rows: [B, KV, G*T, hd] against
        # [B, KV, S, hd]. The same arithmetic as repeating K and V G times, without copying the whole cache
        # every step (with SDPA's enable_gqa on CPU that copy made batched decoding 4-5x slower).
        groups = self.n_heads // self.n_kv_heads
        if mask is None and self.softcap is None:  # plain causal rows: SDPA's causal kernel, no mask to read
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=groups > 1)
            return self.o(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        if mask is None:
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril()[None, None]
        q = q.reshape(B, self.n_kv_heads, groups * T, self.head_dim)
        if groups > 1:
            mask = mask[:, :, None].expand(B, 1, groups, T, mask.shape[-1]).reshape(B, 1, groups * T, -1)
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            # SDPA has no soft-capping: scores by hand, softmax in f32.
            scores = (q @ k.transpose(-1, -2)) * self.scale
            scores = torch.tanh(scores / self.softcap) * self.softcap
            scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.softmax(scores.float(), dim=-1).type_as(q) @ v
        out = out.view(B, self.n_heads, T, self.head_dim)
        return self.o(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class GeGLU(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))
