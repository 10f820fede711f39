"""The Gemma transformer: Gemma 1, 2 and 3 (text) in one class, variants chosen by ModelConfig fields."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gemmalab.errors import GemmalabError
from gemmalab.model.cache import KVCache
from gemmalab.model.config import ModelConfig
from gemmalab.model.layers import Attention, GeGLU, RMSNorm, rope_angles


class Block(nn.Module):
    """Pre-norm attention and GeGLU sub-layers; Gemma 2/3 add a norm on each sub-layer output."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.is_local = c.is_local(layer)
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attn = Attention(c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.attn_scale, c.attn_softcap, c.qk_norm, c.norm_eps)
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = GeGLU(c.dim, c.ffn_dim)
        self.post_attn_norm = RMSNorm(c.dim, c.norm_eps) if c.post_norms else None
        self.post_mlp_norm = RMSNorm(c.dim, c.norm_eps) if c.post_norms else None

    def forward(self, x, cos, sin, mask, kv_write=None):
        h = self.attn(self.attn_norm(x), cos, sin, mask, kv_write)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class Gemma(nn.Module):
    """Decoder-only Gemma language model with tied input/output embeddings.

    `model(tokens)` maps LongTensor [B, T] to logits [B, T, V]. Optional: `positions` [B, T],
    `attention_mask` [B, T] (True for real tokens, False for padding), a `KVCache`, and `num_logits`
    to compute logits for the last `num_logits` positions only (the output projection is the costly part).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head: nn.Module | None = None  # None: tied, x @ embed.T; quantization installs its own module

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random init for training from scratch: normal linear and embedding weights, norms at zero (scale 1)."""
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                num_logits: int | None = None, doc_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        positions, masks, n_real = self.prepare(tokens, positions, attention_mask, cache, doc_ids)
        logits = self.body(tokens, positions, masks, cache, num_logits, return_hidden)
        if cache is not None:
            cache.end(n_real)
        return logits

    def prepare(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                doc_ids: torch.Tensor | None = None):
        """Positions [B, T], attention masks per layer kind, and real tokens per row [B] for one step.

        Default positions count real tokens (so left padding does not shift them), continuing from the cache.
        `doc_ids` [B, T] (packed training rows, no cache) keeps attention within each document; give
        positions that restart at each document with it.
        """
        c = self.config
        B, T = tokens.shape
        real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        given_positions = positions is not None
        if positions is None:
            steps = real.long().cumsum(1) - 1 if attention_mask is not None else torch.arange(T, device=tokens.device).expand(B, T)
            positions = steps.clamp(min=0) + (cache.next_pos[:, None] if cache is not None else 0)
        if T and int(positions.max()) >= c.max_seq_len:
            raise GemmalabError(
                f"Position {int(positions.max())} is beyond this model's maximum of {c.max_seq_len} positions "
                f"(max_seq_len); shorten the input or the number of new tokens."
            )
        key_pos = positions.masked_fill(~real, -1)
        attended = cache.begin(key_pos) if cache is not None else {False: key_pos, True: key_pos}
        window = c.sliding_window if c.sliding_pattern else None
        # Plain causal rows (training, one-shot scoring) get None: SDPA's own causal kernel, which skips the masked
        # half instead of reading a mask; sliding layers keep theirs once rows outgrow the window.
        plain = cache is None and attention_mask is None and doc_ids is None and not given_positions
        masks = {kind: None if plain and (not kind or window is None or T <= window)
                 else _attention_mask(positions, pos, window if kind else None) for kind, pos in attended.items()}
        if doc_ids is not None:
            if cache is not None:
                raise GemmalabError("doc_ids (document masking) is for packed training rows, not for a KV cache.")
            same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]  # [B, 1, T, T]
            masks = {kind: m & same_doc for kind, m in masks.items()}
        return positions, masks, real.sum(1)

    def body(self, tokens: torch.Tensor, positions: torch.Tensor, masks: dict[bool, torch.Tensor],
             cache: KVCache | None = None, num_logits: int | None = None, return_hidden: bool = False) -> torch.Tensor:
        """The tensor part of forward (what torch.compile sees): embedding, layers, norm, logits.

        masks: for global (False) and sliding (True) layers, bool [B, 1, T, S], or None for plain causal. `return_hidden` returns the final
        normed hidden states [B, T, D] instead of logits (for a chunked loss that never builds [B, T, V]).
        """
        c = self.config
        global_rope = rope_angles(positions, c.head_dim, c.rope_theta, c.rope_scaling)
        local_rope = rope_angles(positions, c.head_dim, c.rope_local_theta or c.rope_theta)
        x = self.embed(tokens)
        x = x * torch.tensor(math.sqrt(c.dim), dtype=x.dtype)  # the constant rounded to the activation dtype
        for i, layer in enumerate(self.layers):
            cos, sin = local_rope if layer.is_local else global_rope
            kv_write = (lambda k, v, i=i: cache.write(i, k, v)) if cache is not None else None
            x = layer(x, cos, sin, masks[layer.is_local], kv_write)
        if num_logits is not None:
            x = x[:, -num_logits:]
        x = self.norm(x)
        if return_hidden:
            return x
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)
        if c.final_softcap is not None:
            logits = torch.tanh(logits / c.final_softcap) * c.final_softcap
        return logits


def _attention_mask(q_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask [B, 1, T, S] from positions alone: causal, within `window` if given, padding (-1) hidden.

    q_pos: [B, T]; key_pos: [B, S]. A query that may see no key at all (a padding query) is allowed
    everything, so softmax stays finite; its output is never used.
    """
    dist = q_pos[:, :, None] - key_pos[:, None, :]  # [B, T, S]
    allowed = (key_pos[:, None, :] >= 0) & (dist >= 0)
    if window is not None:
        allowed &= dist < window
    return (allowed | ~allowed.any(-1, keepdim=True))[:, None]
