"""KV cache: preallocated keys and values for every layer, filled left to right."""

from __future__ import annotations

import torch

from gemmalab.errors import GemmalabError
from gemmalab.model.config import ModelConfig


class KVCache:
    """Keys and values [B, KV, capacity, hd] per layer, plus the position of each slot (-1: padding/empty).

    Keys are stored after RoPE. Each slot remembers its token position, so masks (causal, sliding window,
    padding) come from positions alone and left-padded rows need no special case.
    """

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, config.n_kv_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.key_pos = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # next position of each row
        self.capacity = capacity
        self.length = 0  # slots filled

    def reserve(self, key_pos: torch.Tensor) -> torch.Tensor:
        """Claim the next T slots for key positions [B, T]; returns the positions of all filled slots [B, S]."""
        end = self.length + key_pos.shape[1]
        if end > self.capacity:
            raise GemmalabError(f"KV cache is full: {end} slots needed, capacity {self.capacity}.")
        self.key_pos[:, self.length:end] = key_pos
        return self.key_pos[:, :end]

    def writer(self, layer: int, start: int):
        """A function that stores one layer's new k, v [B, KV, T, hd] from slot `start` and returns all of them."""
        def write(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            end = start + k.shape[2]
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        return write

    def advance(self, n_slots: int, n_real: torch.Tensor) -> None:
        """After a forward step: n_slots slots were written, n_real [B] of them real tokens per row."""
        self.length += n_slots
        self.next_pos += n_real
