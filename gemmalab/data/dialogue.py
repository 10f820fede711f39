"""Dialogue data for supervised fine-tuning: JSONL dialogues, their rendering in the Gemma format with a loss
mask, and packed, resumable batches for the training loop.

A line is `{"messages": [{"role", "content"}, ...]}` (roles user / model, `assistant` read as model, a first
`system` message folded into the first user turn as Gemma's template does) or `{"prompt", "response"}` (with an
optional `"system"`). Rendering (`render`) gives the ids of `Tokenizer.apply_chat_template` (one BOS) and the labels:
the content of model turns and their `<end_of_turn>`, nothing else. Dialogues with nothing to learn, or longer than
the limit, are dropped and counted.

Batches (`DialogueBatches`) pack whole dialogues into rows of `seq_len` positions: each dialogue starts at position
0 with a document id of its own, so attention stays inside it (the model's document mask), and the padding at a
row's end has its own document id and no labels. Every epoch visits the dialogues in a seeded order; the state is
(epoch, row), so a resumed run continues with the same batches.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gemmalab.errors import GemmalabError
from gemmalab.files import jsonl_lines

__all__ = ["Example", "SFTBatch", "parse_dialogue", "read_dialogues", "render", "render_all", "pack_rows",
           "rows_batch", "DialogueBatches", "IGNORE"]

IGNORE = -100  # targets without a loss


def parse_dialogue(obj: dict) -> list[dict]:
    """The messages of one JSONL object (either format); a GemmalabError says what is wrong with it."""
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise GemmalabError('"messages" must be a non-empty list of {"role", "content"} objects')
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                    m.get("role") not in ("system", "user", "model", "assistant"):
                raise GemmalabError(f'messages[{i}] must be {{"role": "system"|"user"|"model"|"assistant", '
                                    f'"content": str}}, got {m!r:.120}')
            out.append({"role": "model" if m["role"] == "assistant" else m["role"], "content": m["content"]})
        return out
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise GemmalabError('"system" must be a string')
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": obj["prompt"]}, {"role": "model", "content": obj["response"]}]
    raise GemmalabError('expected {"messages": [...]} or {"prompt": str, "response": str}')


def read_dialogues(path: str | Path) -> Iterator[tuple[str, list[dict] | None, str | None]]:
    """(where, messages, problem) for each non-blank line of a dialogue JSONL file (.gz, .zst too): the messages, or
    None and what is wrong ("file, line 7: ..."): readers count bad lines instead of stopping at them."""
    for n, obj, problem in jsonl_lines(path):
        where = f"{path}, line {n}"
        if problem is None:
            try:
                yield where, parse_dialogue(obj), None
                continue
            except GemmalabError as e:
                problem = str(e)
        yield where, None, f"{where}: {problem}"


@dataclass
class Example:
    """One rendered dialogue. ids: [n] token ids; mask: [n], True on the tokens the model learns to produce."""

    ids: list[int]
    mask: list[bool]
    where: str = ""  # its origin (file and line, or a task name), for reports

    @property
    def length(self) -> int:
        return len(self.ids)


def render(tokenizer, messages: list[dict], max_tokens: int, where: str = "") -> Example | str:
    """The Example of a dialogue, or why it is dropped: "too_long" (more than `max_tokens` tokens),
    "nothing_to_learn" (no model turn), or "invalid_roles" (roles that do not alternate user/model)."""
    from gemmalab.tokenizer import TokenizerError

    try:
        ids, mask = tokenizer.chat_ids_and_mask(messages, add_generation_prompt=False)
    except TokenizerError:
        return "invalid_roles"
    if not any(mask[1:]):  # mask[0] is the BOS, never a target
        return "nothing_to_learn"
    if len(ids) > max_tokens:
        return "too_long"
    return Example(ids, mask, where)


def render_all(tokenizer, dialogues: Sequence[tuple[str, list[dict]]], max_tokens: int
               ) -> tuple[list[Example], Counter]:
    """Render (where, messages) pairs; returns the examples and the count of dropped ones by reason."""
    examples, dropped = [], Counter()
    for where, messages in dialogues:
        out = render(tokenizer, messages, max_tokens, where)
        if isinstance(out, str):
            dropped[out] += 1
        else:
            examples.append(out)
    return examples, dropped


@dataclass
class SFTBatch:
    """Packed rows. inputs, targets, positions, doc_ids: [B, T] (targets IGNORE where there is no loss)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor
    dialogues: list[int] = field(default_factory=list)  # dialogues per row


def pack_rows(examples: Sequence[Example], seq_len: int, packing: bool = True) -> list[list[int]]:
    """Indices of the examples in each row, in order: a row takes the next example while its `length - 1` positions
    fit in `seq_len` (one example per row without `packing`). Every example must fit a row by itself."""
    rows: list[list[int]] = []
    used = seq_len
    for i, ex in enumerate(examples):
        need = ex.length - 1  # inputs ids[:-1], targets ids[1:]
        if need > seq_len:
            raise GemmalabError(f"{ex.where}: {ex.length} tokens do not fit rows of {seq_len} positions")
        if not packing or used + need > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += need
    return rows


def rows_batch(rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int = 0) -> SFTBatch:
    """The batch of these rows, each a list of examples packed back to back."""
    parts = [_row(row, seq_len, pad_id) for row in rows]
    inputs, targets, positions, doc_ids = (torch.from_numpy(np.stack(x)) for x in zip(*parts))
    return SFTBatch(inputs, targets, positions, doc_ids, [len(row) for row in rows])


def _row(examples: Sequence[Example], seq_len: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """inputs, targets, positions, doc_ids [seq_len] of examples packed back to back, then padding."""
    inputs = np.full(seq_len, pad_id, dtype=np.int64)
    targets = np.full(seq_len, IGNORE, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    doc_ids = np.full(seq_len, len(examples), dtype=np.int64)  # the padding is a document of its own
    at = 0
    for d, ex in enumerate(examples):
        n = ex.length - 1
        ids = np.asarray(ex.ids, dtype=np.int64)
        inputs[at:at + n] = ids[:-1]
        targets[at:at + n] = np.where(np.asarray(ex.mask[1:]), ids[1:], IGNORE)
        positions[at:at + n] = np.arange(n)
        doc_ids[at:at + n] = d
        at += n
    positions[at:] = np.arange(seq_len - at)
    return inputs, targets, positions, doc_ids


class DialogueBatches:
    """Endless, resumable batches of `batch_size` packed rows per process (see the module docstring).

    Each epoch orders the examples by a seeded shuffle of (seed, epoch), packs them, and deals the rows to the
    ranks: rank r of world w takes rows r, r + w, ... of each global batch of `batch_size * w` rows.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int, *, pad_id: int = 0,
                 packing: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not examples:
            raise GemmalabError("no training dialogues are left to make batches of")
        if batch_size < 1 or seq_len < 1:
            raise GemmalabError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        self.examples, self.batch_size, self.seq_len = list(examples), batch_size, seq_len
        self.pad_id, self.packing, self.seed, self.rank, self.world_size = pad_id, packing, seed, rank, world_size
        self.epoch, self.row = 0, 0  # the next global row of the current epoch
        self._rows: list[list[int]] | None = None
        self._order: list[int] = []

    def _epoch_rows(self) -> list[list[int]]:
        if self._rows is None:
            self._order = list(range(len(self.examples)))
            random.Random(f"{self.seed}/{self.epoch}").shuffle(self._order)
            packed = pack_rows([self.examples[i] for i in self._order], self.seq_len, self.packing)
            self._rows = [[self._order[i] for i in row] for row in packed]
        return self._rows

    @property
    def rows_per_epoch(self) -> int:
        return len(self._epoch_rows())

    def _next_row(self) -> list[int]:
        rows = self._epoch_rows()
        if self.row >= len(rows):
            self.epoch, self.row, self._rows = self.epoch + 1, 0, None
            rows = self._epoch_rows()
        self.row += 1
        return rows[self.row - 1]

    def __iter__(self) -> DialogueBatches:
        return self

    def __next__(self) -> SFTBatch:
        mine = []
        for r in range(self.batch_size * self.world_size):
            row = self._next_row()
            if r % self.world_size == self.rank:
                mine.append(row)
        return rows_batch([[self.examples[i] for i in row] for row in mine], self.seq_len, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("examples") != len(self.examples):
            raise GemmalabError(f"the saved batch state is over {state.get('examples')} dialogues, this run has "
                                f"{len(self.examples)}: resume with the same data and filters")
        self.epoch, self.row, self._rows = int(state["epoch"]), int(state["row"]), None
