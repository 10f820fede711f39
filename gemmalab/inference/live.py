"""Continuous batching: rows join and leave a running batch between decode steps.

`LiveBatch` keeps the rows being decoded in a `RowCache`, where each row holds the key of position p in column p, so
rows of different lengths decode together in one step. A joining row is prefilled alone, up to `chunk` tokens at a
time, in a one-row cache of its own, then copied into a free slot; a finished or dropped row frees its slot at once.
Between steps the cache grows (more slots, more columns) when a joining row needs it and shrinks when most slots are
idle, so its memory follows the rows actually running, within a byte budget.

The server's worker runs on it (gemmalab/serve/batcher.py). `Engine.generate` keeps its own left-padded batches
for a fixed set of prompts (and sliding-window rings); both sample each row with `_Row.advance`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemmalab.errors import GemmalabError
from gemmalab.inference.engine import Engine, SamplingParams, _gemv_friendly, _Row, argmax, eval_mode, sample_row
from gemmalab.model.cache import RowCache

COLUMN_STEP = 128  # the cache's columns grow and shrink in multiples of this: few copies, little waste


@dataclass(eq=False)
class Prefill:
    """A row on its way in: its prompt fed a chunk at a time into a one-row cache of its own."""

    row: _Row
    cache: RowCache
    done: int = 0  # prompt tokens fed so far
    logits: torch.Tensor | None = None  # [V] f32 after the last prompt token, once every one is fed


@dataclass
class RowEvent:
    """What one decode step did to one row: its new text, or the error that ended it."""

    row: _Row
    delta: str = ""
    error: Exception | None = None


class LiveBatch:
    """The rows of one engine being decoded together; at most `max_rows` of them, their keys and values within
    `budget_bytes` (None: no limit) besides the one joining row's own cache."""

    def __init__(self, engine: Engine, max_rows: int, budget_bytes: int | None = None, chunk: int = 256):
        if max_rows < 1 or chunk < 1:
            raise GemmalabError(f"max_rows and chunk must be >= 1, got {max_rows} and {chunk}.")
        self.engine, self.model, self.max_rows, self.budget, self.chunk = (
            engine, engine.model, max_rows, budget_bytes, chunk)
        c = self.model.config
        self.dtype, self.device = self.model.embed.weight.dtype, engine.device
        element = torch.empty((), dtype=self.dtype).element_size()
        self.token_bytes = 2 * c.n_layers * c.n_kv_heads * c.head_dim * element  # keys and values of one position
        self.cache: RowCache | None = None
        self.slots: list[_Row | None] = []  # one per cache row; None: free
        self.fed: list[int] = []  # the token each slot feeds at the next step
        self.steps = 0

    # ---- sizes ------------------------------------------------------------------------------------------------------

    @property
    def rows(self) -> list[_Row]:
        return [r for r in self.slots if r is not None]

    def columns(self, positions: int) -> int:
        """Cache columns for rows that reach up to `positions` positions."""
        return min(-(-positions // COLUMN_STEP) * COLUMN_STEP, self.model.config.max_seq_len)

    def bytes_for(self, rows: int, positions: int) -> int:
        """Bytes of a cache of `rows` rows holding `positions` positions each (rounded up to whole columns)."""
        return rows * self.columns(positions) * self.token_bytes

    @staticmethod
    def reach(row: _Row) -> int:
        """The positions `row` may fill: its prompt and every token it may generate."""
        return len(row.prompt) + row.params.max_new_tokens

    def fits_alone(self, positions: int) -> bool:
        """Whether a row reaching `positions` could ever run here (alone, within the budget)."""
        return positions <= self.most_positions()

    def most_positions(self) -> int:
        """The most positions one row may reach within the budget (and the model's context)."""
        limit = self.model.config.max_seq_len
        if self.budget is None:
            return limit
        columns = self.budget // self.token_bytes
        return min(limit, columns if columns >= limit else columns // COLUMN_STEP * COLUMN_STEP)

    def _plan(self, positions: int) -> tuple[int, int] | None:
        """(rows, columns) of the cache once a row reaching `positions` joins; None when it does not fit now."""
        live = self.rows
        if len(live) >= self.max_rows:
            return None
        columns = self.columns(max([positions] + [self.reach(r) for r in live]))
        slots = len(self.slots)
        grown = slots if len(live) < slots else min(self.max_rows, max(1, 2 * slots))  # doubling: few copies
        for rows in (grown, len(live) + 1):
            if self.budget is None or rows * columns * self.token_bytes <= self.budget:
                return rows, columns
        return None

    def fits(self, positions: int) -> bool:
        """Whether a row reaching `positions` can join now."""
        return self._plan(positions) is not None

    def bytes(self) -> int:
        return 0 if self.cache is None else self.cache.bytes()

    # ---- rows in and out --------------------------------------------------------------------------------------------

    def new_row(self, prompt: list[int], params: SamplingParams) -> _Row:
        params.check()
        if not prompt:
            raise GemmalabError("Every prompt needs at least one token.")
        if len(prompt) + params.max_new_tokens > self.model.config.max_seq_len:
            raise GemmalabError(f"The prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) "
                                f"exceeds this model's {self.model.config.max_seq_len} positions.")
        return self.engine._row(0, prompt, params)

    def begin(self, row: _Row) -> Prefill:
        """Start bringing `row` in; feed it with `feed`, then `place` it."""
        return Prefill(row, RowCache(self.model.config, 1, self.columns(self.reach(row)), self.dtype, self.device))

    @torch.inference_mode()
    def feed(self, p: Prefill, most: int) -> int:
        """Feed up to min(`most`, chunk) more prompt tokens of `p` (at least one); returns how many were fed."""
        n = max(1, min(self.chunk, most, len(p.row.prompt) - p.done))
        ids = torch.tensor([p.row.prompt[p.done:p.done + n]], device=self.device)
        with eval_mode(self.model):
            logits = self.model(ids, cache=p.cache, num_logits=1)  # [1, 1, V]
        p.done += n
        if p.done == len(p.row.prompt):
            p.logits = logits[0, -1].float()
        return n

    @torch.inference_mode()
    def place(self, p: Prefill) -> str:
        """Put a fully fed row into a slot and take its first token; returns that token's text. The row leaves at
        once if that token finished it."""
        if p.logits is None:
            raise GemmalabError("place() before the whole prompt was fed.")
        plan = self._plan(self.reach(p.row))
        if plan is None:
            raise GemmalabError("No room for the row: check fits() before begin().")
        if None not in self.slots or plan[1] > self.cache.capacity:
            self._rebuild(*plan)
        slot = self.slots.index(None)
        self.cache.load_row(slot, p.cache)
        r = p.row
        logp = torch.log_softmax(p.logits, -1) if r.params.logprobs else None
        tok = sample_row(p.logits, r.params, r.generator)
        delta = r.advance(tok, logp)
        self.slots[slot], self.fed[slot] = r, tok
        if r.finish_reason is not None:
            self.drop(r)
        return delta

    def drop(self, row: _Row) -> None:
        """Free `row`'s slot (finished, cancelled, failed); the cache shrinks when most slots are idle."""
        for s, r in enumerate(self.slots):
            if r is row:
                self.slots[s] = None
        self._shrink()

    def clear(self) -> None:
        """Forget every row and free the cache."""
        self.cache, self.slots, self.fed = None, [], []

    # ---- decoding ---------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RowEvent]:
        """One decode step of every row: each takes one token. A row whose sampling fails ends alone (its event
        carries the error); finished rows leave."""
        live = [(s, r) for s, r in enumerate(self.slots) if r is not None]
        if not live:
            return []
        idle = [s for s, r in enumerate(self.slots) if r is None]
        if idle:  # idle slots write column 0 again and again, and their output is ignored
            self.cache.next_pos[idle] = 0
        tokens = torch.tensor(self.fed, device=self.device)[:, None]  # [rows, 1]
        with eval_mode(self.model), _gemv_friendly(len(self.slots), self.model.embed.weight):
            logits = self.model(tokens, cache=self.cache, num_logits=1)[:, -1].float()  # [rows, V]
        greedy = argmax(logits).tolist()
        logp = torch.log_softmax(logits, -1) if any(r.params.logprobs for _, r in live) else None
        events = []
        for s, r in live:
            try:
                tok = r.pick(logits[s], greedy[s])
                events.append(RowEvent(r, r.advance(tok, None if logp is None else logp[s])))
                self.fed[s] = tok
            except Exception as e:  # noqa: BLE001 - this row's own failure (its stream, its params): it alone ends
                r.finish_reason = r.finish_reason or "error"
                events.append(RowEvent(r, error=e))
            if r.finish_reason is not None:
                self.slots[s] = None
        self.steps += 1
        self._shrink()
        return events

    def _shrink(self) -> None:
        live = self.rows
        if not live:
            self.clear()
            return
        columns = self.columns(max(self.reach(r) for r in live))
        if 4 * len(live) <= len(self.slots) or 2 * columns <= self.cache.capacity:
            self._rebuild(min(self.max_rows, 1 << (len(live) - 1).bit_length()), columns)

    def _rebuild(self, rows: int, columns: int) -> None:
        """A new cache of `rows` x `columns`: the live rows move to its first slots, in order."""
        keep = [s for s, r in enumerate(self.slots) if r is not None]
        new = RowCache(self.model.config, rows, columns, self.dtype, self.device)
        if keep:
            idx = torch.tensor(keep, device=self.device)
            n = min(columns, self.cache.capacity)  # every live row's positions are below both
            for mine, old in zip(new.k + new.v, self.cache.k + self.cache.v):
                mine[:len(keep), :, :n] = old.index_select(0, idx)[:, :, :n]
            new.pos[:len(keep), :n] = self.cache.pos.index_select(0, idx)[:, :n]
            new.next_pos[:len(keep)] = self.cache.next_pos.index_select(0, idx)
        free = rows - len(keep)
        self.cache = new
        self.slots = [self.slots[s] for s in keep] + [None] * free
        self.fed = [self.fed[s] for s in keep] + [0] * free
