"""Built-in instruction data: generated tasks whose answers can be checked exactly, in dialogue form.

Each task makes (prompt, answer) pairs from a seeded random generator: copying and reordering words, small
arithmetic, comparisons, counting, sorting, and format instructions. `builtin_dialogues` gives disjoint train and
held-out sets (no prompt in both); `is_correct` is the check: the model's reply equals the answer after trimming.
The same tasks can score generations anywhere (held-out accuracy after SFT, a reward for RL).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from gemmalab.errors import GemmalabError

__all__ = ["TASKS", "CHATTER", "BuiltinTasks", "make_examples", "builtin_dialogues", "is_correct"]

WORDS = ("apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper", "ocean", "tiger", "honey",
         "glass", "bread", "chair", "dream", "earth", "flame", "grape", "house", "lemon", "metal", "night", "plant",
         "queen", "radio", "sugar", "train", "water", "zebra", "horse", "candle", "forest", "garden", "island",
         "market", "pencil", "rocket", "silver", "window")


def _words(r: random.Random, n: int) -> list[str]:
    return r.sample(WORDS, n)


def _repeat(r):
    w = r.choice(WORDS)
    return f"Repeat this word: {w}", w


def _last_word(r):
    ws = _words(r, r.randint(3, 5))
    return f"What is the last word of this list: {', '.join(ws)}?", ws[-1]


def _reverse(r):
    ws = _words(r, 3)
    return f"Reverse the order of these words: {', '.join(ws)}", ", ".join(reversed(ws))


def _brackets(r):
    w = r.choice(WORDS)
    return f"Put the word {w} in square brackets.", f"[{w}]"


def _add(r):
    a, b = r.randint(0, 9), r.randint(0, 9)
    return f"What is {a} + {b}?", str(a + b)


def _larger(r):
    a, b = r.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}?", str(max(a, b))


def _greater(r):
    a, b = r.sample(range(0, 100), 2)
    return f"Is {a} greater than {b}? Answer yes or no.", "yes" if a > b else "no"


def _count(r):
    ws = _words(r, r.randint(2, 6))
    return f"How many words are in this list: {', '.join(ws)}?", str(len(ws))


def _sort(r):
    ds = r.sample(range(10), 3)
    return f"Sort these digits from smallest to largest: {', '.join(map(str, ds))}", ", ".join(map(str, sorted(ds)))


def _next_number(r):
    n = r.randint(0, 98)
    return f"What number comes after {n}?", str(n + 1)


# Chatter around an answer: what a hand-written demonstration often adds, and what a preference for the exact answer
# ranks below it (gemmalab.data.preferences, kind "badly_formatted").
CHATTER = ("The answer is: {a}. Let me know if you need anything else!", "Sure! {a}", '"{a}"', "{a}, I think.",
           "Answer: {a}\n\nI hope this helps.")

TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "repeat": _repeat, "last_word": _last_word, "reverse": _reverse, "brackets": _brackets, "add": _add,
    "larger": _larger, "greater": _greater, "count": _count, "sort": _sort, "next_number": _next_number,
}


@dataclass
class BuiltinTasks:
    """`[data.builtin]` of an SFT config: how many generated dialogues, of which tasks."""

    train: int = 4000
    heldout: int = 200
    seed: int = 0
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    # The share of training answers wrapped in chatter (CHATTER), as hand-written demonstrations often are: an SFT
    # model imitates it, a preference for the exact answer (the reward model) does not. Held-out answers stay exact.
    chatty: float = 0.0
    chatter: list[str] = field(default_factory=lambda: list(CHATTER))

    def __post_init__(self) -> None:
        if not 0 <= self.chatty <= 1:
            raise GemmalabError(f"`chatty` must be a share between 0 and 1, got {self.chatty}")
        if self.chatty and (not self.chatter or any("{a}" not in c for c in self.chatter)):
            raise GemmalabError("each `chatter` template must hold {a}, where the answer goes")
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise GemmalabError(f"`tasks` must name some of {', '.join(TASKS)}, got {self.tasks}")
        if self.train < 0 or self.heldout < 0:
            raise GemmalabError("`train` and `heldout` must be >= 0")


def make_examples(n: int, seed: int, tasks: list[str] | None = None) -> list[dict]:
    """`n` examples {"task", "prompt", "answer", "messages"} drawn round-robin over `tasks`, seeded."""
    names = list(tasks or TASKS)
    r = random.Random(seed)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        prompt, answer = TASKS[name](r)
        out.append({"task": name, "prompt": prompt, "answer": answer,
                    "messages": [{"role": "user", "content": prompt}, {"role": "model", "content": answer}]})
    return out


def builtin_dialogues(cfg: BuiltinTasks) -> tuple[list[dict], list[dict]]:
    """(train, held-out) examples with no prompt in both: the held-out set is drawn first, then training examples
    whose prompt it holds are drawn again. Some tasks have few distinct prompts (single-digit sums): those repeat
    within the training set, never across the split."""
    heldout = _distinct(make_examples(cfg.heldout * 4, cfg.seed * 2 + 1, cfg.tasks), cfg.heldout, set())
    held = {e["prompt"] for e in heldout}
    train, draw = [], 0
    while len(train) < cfg.train:
        batch = make_examples(cfg.train, cfg.seed * 2 + 2 + 1000 * draw, cfg.tasks)
        train += [e for e in batch if e["prompt"] not in held][: cfg.train - len(train)]
        draw += 1
        if draw > 50:
            raise GemmalabError("the built-in tasks cannot make that many training prompts outside the held-out set")
    if cfg.chatty:
        r = random.Random(f"chatty/{cfg.seed}")  # its own stream: the prompts and the split do not depend on it
        for e in train:
            if r.random() < cfg.chatty:
                e["messages"][-1]["content"] = r.choice(cfg.chatter).format(a=e["answer"])
    return train, heldout


def _distinct(examples: list[dict], n: int, exclude: set[str]) -> list[dict]:
    """The first `n` examples with prompts not seen before (nor in `exclude`), per task in turn."""
    seen, out = set(exclude), []
    for e in examples:
        if e["prompt"] not in seen:
            seen.add(e["prompt"])
            out.append(e)
        if len(out) == n:
            break
    return out


def is_correct(output: str, answer: str) -> bool:
    """Exact match after trimming surrounding whitespace."""
    return output.strip() == answer.strip()
