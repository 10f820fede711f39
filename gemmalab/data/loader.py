"""TokenLoader: deterministic, resumable, data-parallel batches from packed token shards.

How batches are made:
- Each source (across all shard folders) is an endless token stream: epoch e is the source's
  documents in a seeded permutation of (seed, source, e), back to back; epoch e+1 follows directly.
- A batch is `world_size * batch_size` rows (the global batch); rank r gets rows
  [r * batch_size, (r + 1) * batch_size). Each row is T + 1 consecutive tokens of one source's
  stream; the next row of that source starts T tokens later (the last token of a row is the first
  of the next), so every token is an input exactly once per epoch.
- The source of each global row follows the mixture stage in force at the tokens seen so far
  (all ranks together), by smooth weighted round robin: each row adds every source's weight to
  its credit and takes the source with the most credit, so the token share of each source is
  within one row of its weight at every point. Credits restart at each stage.
- Rows are packed across document boundaries (EOS of one document, then BOS of the next);
  `positions` restart at 0 at each document start and at the row start, and `doc_ids` number the
  documents within a row, for document-masked attention: a key is visible to a query when their
  doc_ids are equal and its position is not larger. (Positions alone do not give that mask: the
  next document in a row comes later but has smaller positions.)

The whole state is a few counters (`state_dict`), identical on every rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gemmalab.data.mixture import Mixture
from gemmalab.data.packing import read_meta
from gemmalab.errors import GemmalabError

__all__ = ["Batch", "TokenLoader"]

_STATE_VERSION = 1


@dataclass
class Batch:
    """One rank's batch. tokens: [B, T+1]; positions, doc_ids: [B, T] (for the inputs); sources: B names."""

    tokens: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor
    sources: list[str]

    @property
    def inputs(self) -> torch.Tensor:
        """[B, T] tokens fed to the model."""
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        """[B, T] next-token targets."""
        return self.tokens[:, 1:]


class _Source:
    """All documents of one source, as an endless stream of epochs in seeded order."""

    def __init__(self, name: str, shard: np.ndarray, start: np.ndarray, length: np.ndarray, seed: int) -> None:
        self.name = name
        self.shard, self.start, self.length = shard, start, length  # [N] each: where document i lives
        self.total = int(length.sum())  # tokens per epoch
        self._seed = [int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))]
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order [N], cum [N+1]): document order of `epoch` and stream offset of each, within the epoch."""
        if epoch not in self._layouts:
            order = np.random.default_rng(self._seed + [epoch]).permutation(len(self.length))
            cum = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.length[order], out=cum[1:])
            if len(self._layouts) >= 2:  # rows move forward, so the current and next epoch suffice
                self._layouts.pop(min(self._layouts))
            self._layouts[epoch] = (order, cum)
        return self._layouts[epoch]

    def read(self, pos: int, n: int, shards: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Stream tokens [pos, pos + n) as (tokens int64 [n], doc_start bool [n])."""
        out = np.empty(n, dtype=np.int64)
        is_start = np.zeros(n, dtype=bool)
        filled = 0
        while filled < n:
            epoch, off = divmod(pos + filled, self.total)
            order, cum = self.layout(epoch)
            k = int(np.searchsorted(cum, off, side="right")) - 1
            while filled < n and k < len(order):
                d = order[k]
                in_doc = off - int(cum[k])
                take = min(int(self.length[d]) - in_doc, n - filled)
                s = int(self.start[d]) + in_doc
                out[filled:filled + take] = shards[self.shard[d]][s:s + take]
                is_start[filled] = in_doc == 0
                filled += take
                off += take
                k += 1
        return out, is_start


class TokenLoader:
    """Batches from one or more packed token shard folders; see the module docstring for the semantics.

    Args:
        shard_dirs: folders written by `gemmalab.data.packing.pack` (same tokenizer); a source that
            appears in several folders is one source.
        batch_size: rows per rank (B).
        seq_len: tokens per row input (T); None: the seq_len recorded in meta.json.
        mixture: source weights by stage; None: one stage with each source's share of all tokens.
        total_tokens: tokens of the whole run over all ranks (the mixture schedule's 100%, and where
            iteration stops); None: endless, allowed only with a single-stage mixture.
        rank, world_size: data-parallel position (e.g. `torch.distributed.get_rank()`).
        seed: document order per source and epoch.
    """

    def __init__(self, shard_dirs: str | Path | Sequence[str | Path], batch_size: int, seq_len: int | None = None,
                 mixture: Mixture | None = None, total_tokens: int | None = None, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        dirs = [Path(shard_dirs)] if isinstance(shard_dirs, (str, Path)) else [Path(d) for d in shard_dirs]
        if not dirs:
            raise GemmalabError("TokenLoader needs at least one token shard folder")
        if len({d.resolve() for d in dirs}) != len(dirs):
            raise GemmalabError(f"token shard folders {[str(d) for d in dirs]} name the same folder twice")
        if batch_size < 1:
            raise GemmalabError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise GemmalabError(f"rank {rank} is not in [0, world_size={world_size})")
        if total_tokens is not None and total_tokens <= 0:
            raise GemmalabError(f"total_tokens must be positive, got {total_tokens}")
        metas = [read_meta(d) for d in dirs]
        for d, m in zip(dirs[1:], metas[1:]):
            if (m.tokenizer_fingerprint, m.vocab_size) != (metas[0].tokenizer_fingerprint, metas[0].vocab_size):
                raise GemmalabError(f"token shards {d} were made with a different tokenizer than {dirs[0]} "
                                    f"(fingerprint {m.tokenizer_fingerprint[:12]} vs {metas[0].tokenizer_fingerprint[:12]})")
        self.meta = metas[0]
        self.seq_len = int(seq_len if seq_len is not None else self.meta.seq_len)
        if self.seq_len < 1:
            raise GemmalabError(f"seq_len must be >= 1, got {self.seq_len}")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.total_tokens = total_tokens
        self._shards: list[np.ndarray] = []
        self.sources = self._open(dirs, metas, seed)
        if mixture is None:
            mixture = Mixture.constant({name: s.total for name, s in self.sources.items()})
        mixture.check_sources(self.sources)
        if total_tokens is None and len(mixture.stages) > 1:
            raise GemmalabError("a mixture with several stages needs total_tokens (the stages are fractions of it)")
        self.mixture = mixture
        # Identifies the data and seed, so a state from other data is refused.
        self._data_id = hashlib.sha256(json.dumps(
            [[m.tokenizer_fingerprint, m.num_docs, m.num_tokens, m.sources] for m in metas] + [seed],
            sort_keys=True).encode()).hexdigest()[:16]
        self._reset()

    # ---- data --------------------------------------------------------------------------------

    def _open(self, dirs: list[Path], metas: list, seed: int) -> dict[str, _Source]:
        parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        for d, m in zip(dirs, metas):
            for info in m.shards:
                tok_path, idx_path = d / info.tokens, d / info.index
                if not tok_path.is_file() or tok_path.stat().st_size != 4 * info.num_tokens:
                    raise GemmalabError(f"{tok_path} is missing or not {info.num_tokens} uint32 tokens as "
                                        f"{d / 'meta.json'} says; re-run packing")
                try:
                    index = np.load(idx_path)
                except (OSError, ValueError) as e:
                    raise GemmalabError(f"cannot read document index {idx_path}: {e}") from None
                if index.shape != (info.num_docs, 3):
                    raise GemmalabError(f"{idx_path} has shape {index.shape}, expected ({info.num_docs}, 3)")
                k = len(self._shards)
                self._shards.append(np.memmap(tok_path, dtype="<u4", mode="r", shape=(info.num_tokens,))
                                    if info.num_tokens else np.zeros(0, dtype="<u4"))
                for num, name in enumerate(m.source_names):
                    rows = index[index[:, 2] == num]
                    if len(rows):
                        parts.setdefault(name, []).append((np.full(len(rows), k, dtype=np.int32),
                                                           rows[:, 0].copy(), rows[:, 1].copy()))
        if not parts:
            raise GemmalabError(f"token shard folders {[str(d) for d in dirs]} hold no documents")
        return {name: _Source(name, *(np.concatenate(c) for c in zip(*parts[name])), seed=seed)
                for name in sorted(parts)}

    # ---- schedule ------------------------------------------------------------------------------

    def _reset(self) -> None:
        self.tokens_seen = 0  # input tokens of all ranks so far
        self.batches = 0
        self._stream_pos = {name: 0 for name in self.sources}
        self._credits: dict[str, float] = {}
        self._stage = -1

    def _next_source(self) -> str:
        """The source of the next global row (smooth weighted round robin within the current stage)."""
        stage = 0 if self.total_tokens is None else self.mixture.stage_index(self.tokens_seen, self.total_tokens)
        if stage != self._stage:
            self._stage, self._credits = stage, {}
        weights = self.mixture.stages[stage].normalized()
        for name in sorted(weights):
            self._credits[name] = self._credits.get(name, 0.0) + weights[name]
        pick = max(sorted(weights), key=lambda n: self._credits[n])  # ties: first name in sorted order
        self._credits[pick] -= 1.0
        return pick

    @property
    def num_batches(self) -> int | None:
        """Batches in the whole run (None when endless)."""
        if self.total_tokens is None:
            return None
        return math.ceil(self.total_tokens / (self.world_size * self.batch_size * self.seq_len))

    @property
    def epochs(self) -> dict[str, float]:
        """Epochs consumed per source so far (all ranks together)."""
        return {n: self._stream_pos[n] / s.total for n, s in self.sources.items()}

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.total_tokens is not None and self.tokens_seen >= self.total_tokens:
            raise StopIteration
        B, T = self.batch_size, self.seq_len
        tokens = np.empty((B, T + 1), dtype=np.int64)
        starts = np.empty((B, T), dtype=bool)
        names: list[str] = []
        for row in range(self.world_size * B):
            name = self._next_source()
            pos = self._stream_pos[name]
            self._stream_pos[name] = pos + T
            self.tokens_seen += T
            mine = row - self.rank * B
            if 0 <= mine < B:  # only this rank's rows are read; the others only advance the counters
                tokens[mine], is_start = self.sources[name].read(pos, T + 1, self._shards)
                starts[mine] = is_start[:T]
                names.append(name)
        self.batches += 1
        # positions: distance to the last document start at or before t (the row start counts as one)
        idx = np.broadcast_to(np.arange(T), (B, T))
        last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
        positions = (idx - last_start).astype(np.int64)
        doc_ids = (np.cumsum(starts, axis=1) - starts[:, :1]).astype(np.int64)
        return Batch(torch.from_numpy(tokens), torch.from_numpy(positions), torch.from_numpy(doc_ids), names)

    # ---- resume --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the loader is: plain ints, floats and strings (JSON- and torch.save-able), the same on every rank."""
        return {"version": _STATE_VERSION, "data": self._data_id, "tokens_seen": self.tokens_seen,
                "batches": self.batches, "stream_pos": dict(self._stream_pos), "credits": dict(self._credits),
                "stage": self._stage}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a loader over the same data and seed.

        batch_size, world_size and seq_len may differ from the saved loader's (the state counts tokens).
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise GemmalabError(f"loader state has version {state.get('version') if isinstance(state, dict) else None!r}, "
                                f"expected {_STATE_VERSION}")
        if state.get("data") != self._data_id:
            raise GemmalabError("loader state was saved over different token shards or another seed; "
                                "resume with the same shard folders and seed")
        if set(state["stream_pos"]) != set(self.sources):
            raise GemmalabError(f"loader state has sources {sorted(state['stream_pos'])}, the data has {sorted(self.sources)}")
        self.tokens_seen = int(state["tokens_seen"])
        self.batches = int(state["batches"])
        self._stream_pos = {k: int(v) for k, v in state["stream_pos"].items()}
        self._credits = {k: float(v) for k, v in state["credits"].items()}
        self._stage = int(state["stage"])
