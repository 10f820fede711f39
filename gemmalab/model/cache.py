"""KV cache: preallocated keys and values; sliding-window layers keep only their window."""

from __future__ import annotations

import torch

from gemmalab.errors import GemmalabError
from gemmalab.model.config import ModelConfig


class KVCache:
    """Keys (after RoPE) and values [B, KV, slots, hd] for every layer, and the token position of each slot.

    Global layers get `capacity` slots, filled left to right. Sliding-window layers get a ring of `window`
    slots when the capacity is larger, so their memory stays O(window) however long the sequence grows.
    Masks come from slot positions alone (-1: empty or padding), so left padding needs no special case.

    A forward step calls `begin(key_pos)` (positions of the new keys; returns the positions of the keys each
    kind of layer attends to), `write(layer, k, v)` per layer, then `end(n_real)`. A single-token step
    attends over the whole buffer, so decode shapes are static (good for torch.compile).
    """

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        window = config.sliding_window if config.sliding_pattern else None
        self.ring = window is not None and window < capacity
        self.capacity, self.window = capacity, window if self.ring else capacity
        self.local = [config.is_local(i) for i in range(config.n_layers)]
        self.k, self.v = [], []
        for is_local in self.local:
            shape = (batch_size, config.n_kv_heads, self.window if is_local else capacity, config.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.pos = {False: torch.full((batch_size, capacity), -1, dtype=torch.long, device=device),
                    True: torch.full((batch_size, self.window), -1, dtype=torch.long, device=device)}
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # next position of each row
        self.length = 0  # steps (columns) written so far
        self._step: tuple[int, int] = (0, 0)
        self._slots: dict[bool, torch.Tensor] = {}

    @property
    def batch_size(self) -> int:
        return self.next_pos.shape[0]

    def begin(self, key_pos: torch.Tensor) -> dict[bool, torch.Tensor]:
        """Claim slots for new keys at positions [B, T]; returns, for global (False) and sliding (True) layers,
        the positions [B, S] of the keys that this step's queries attend to, in the order `write` returns them."""
        start, T = self.length, key_pos.shape[1]
        end = start + T
        if end > self.capacity:
            raise GemmalabError(f"KV cache is full: {end} slots needed, capacity {self.capacity}.")
        device = key_pos.device
        self._step = (start, T)
        self._slots[False] = torch.arange(start, end, device=device)
        self.pos[False].index_copy_(1, self._slots[False], key_pos)
        attended = {False: self.pos[False] if T == 1 else self.pos[False][:, :end]}
        if not self.ring:
            self._slots[True] = self._slots[False]
            self.pos[True] = self.pos[False]
            attended[True] = attended[False]
            return attended
        kept = min(T, self.window)  # a chunk longer than the window leaves only its last `window` keys
        self._slots[True] = torch.arange(end - kept, end, device=device) % self.window
        if T == 1:
            self.pos[True].index_copy_(1, self._slots[True], key_pos)
            attended[True] = self.pos[True]
        else:  # the chunk attends to the ring as it was plus all its own keys
            attended[True] = torch.cat([self.pos[True], key_pos], dim=1)
            self.pos[True].index_copy_(1, self._slots[True], key_pos[:, T - kept:])
        return attended

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new k, v [B, KV, T, hd]; returns the keys and values its queries attend to."""
        start, T = self._step
        is_local = self.local[layer] and self.ring
        kbuf, vbuf = self.k[layer], self.v[layer]
        if is_local and T > 1:
            k_all, v_all = torch.cat([kbuf, k], dim=2), torch.cat([vbuf, v], dim=2)
            kept = self._slots[True].shape[0]
            kbuf.index_copy_(2, self._slots[True], k[:, :, T - kept:])
            vbuf.index_copy_(2, self._slots[True], v[:, :, T - kept:])
            return k_all, v_all
        slots = self._slots[is_local]
        kbuf.index_copy_(2, slots, k)
        vbuf.index_copy_(2, slots, v)
        if T == 1 or is_local:
            return kbuf, vbuf
        return kbuf[:, :, :start + T], vbuf[:, :, :start + T]

    def end(self, n_real: torch.Tensor) -> None:
        """Finish a step whose rows held n_real [B] real (non-padding) tokens."""
        self.length += self._step[1]
        self.next_pos += n_real

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every batch row not in `rows` (finished sequences retire from the batch)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.pos = {kind: p.index_select(0, rows) for kind, p in self.pos.items()}
        if not self.ring:
            self.pos[True] = self.pos[False]
        self.next_pos = self.next_pos.index_select(0, rows)


class RowCache:
    """A KV cache whose rows are independent: each row keeps the key of position p in column p, so rows at
    different positions share one batch, and a row can be refilled alone (`load_row`) while the others continue:
    continuous batching for equal-capacity jobs (the memorization audit). Same interface as `KVCache` (begin,
    write, end, next_pos); no sliding-window ring, sliding layers are masked by position instead.

    A decode step feeds every row one token at its own next position; a row kept idle (`park`) writes position 0
    again and again and is ignored.
    """

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.capacity = capacity
        shape = (batch_size, config.n_kv_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.pos = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._index: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.next_pos.shape[0]

    def begin(self, key_pos: torch.Tensor) -> dict[bool, torch.Tensor]:
        if int(key_pos.max()) >= self.capacity:
            raise GemmalabError(f"RowCache is full: position {int(key_pos.max())}, capacity {self.capacity}.")
        self._index = key_pos  # [B, T]: the columns this step writes
        self.pos.scatter_(1, key_pos, key_pos)
        return {False: self.pos, True: self.pos}

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v [B, KV, T, hd] into columns _index [B, T] of each row; indexing, not scatter_: the same writes, and
        # scatter_ of bf16 runs 15x slower than of fp32 on CPU (torch 2.13: 0.44 ms per layer at B = 64)
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
        self.k[layer][rows, :, self._index] = k.transpose(1, 2)  # the indexed view is [B, T, KV, hd]
        self.v[layer][rows, :, self._index] = v.transpose(1, 2)
        return self.k[layer], self.v[layer]

    def end(self, n_real: torch.Tensor) -> None:
        self.next_pos += n_real

    def load_row(self, row: int, other: RowCache, other_row: int = 0) -> None:
        """Row `row` becomes a copy of `other`'s row `other_row` (same config; `other` may hold fewer columns)."""
        n = other.capacity
        if n > self.capacity:
            raise GemmalabError(f"Cannot load a row of {n} columns into a RowCache of {self.capacity}.")
        for mine, theirs in zip(self.k + self.v, other.k + other.v):
            mine[row, :, :n] = theirs[other_row]
        self.pos[row] = -1
        self.pos[row, :n] = other.pos[other_row]
        self.next_pos[row] = other.next_pos[other_row]

    def bytes(self) -> int:
        """Bytes the keys and values take."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def park(self, row: int) -> None:
        """Row `row` holds nothing; its next token goes to position 0 and is ignored."""
        self.pos[row] = -1
        self.next_pos[row] = 0
