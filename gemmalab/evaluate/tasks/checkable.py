"""The built-in checkable tasks (gemmalab.data.instruct) as a benchmark for chat models: each held-out prompt in
the Gemma dialogue format, the greedy answer up to <end_of_turn>, exact match after trimming, also per task. With
the defaults (200 prompts of every task, seed 0) these are the held-out prompts of the shipped SFT, reward and
RLHF configs, which none of them trains on: the same figure as their result.json's held-out accuracy."""

from __future__ import annotations

from gemmalab.data.instruct import BuiltinTasks, builtin_dialogues, is_correct
from gemmalab.evaluate.tasks.base import Sample, Task

MAX_NEW_TOKENS = 32  # the longest answer (three words reversed) is about 12 tokens


def chat_prompt(user: str) -> str:
    """The dialogue format as text (its control tokens are parsed to their ids when encoded, after BOS)."""
    return f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"


def load_checkable(heldout: int = 200, seed: int = 0, tasks: list[str] | None = None) -> Task:
    """The held-out split of `BuiltinTasks(heldout=heldout, seed=seed, tasks=tasks)` (what an SFT run with those
    settings holds out)."""
    _, examples = builtin_dialogues(BuiltinTasks(train=0, heldout=heldout, seed=seed, **({"tasks": tasks} if tasks else {})))
    samples = [Sample(id=f"{e['task']}:{i}", prompt=chat_prompt(e["prompt"]), gold=e["answer"], data={"task": e["task"]})
               for i, e in enumerate(examples)]
    return Task(name="checkable", kind="generate", samples=samples, metric="exact_match", stop=("<end_of_turn>",),
                max_new_tokens=MAX_NEW_TOKENS, score=lambda s, text: {"exact_match": float(is_correct(text, s.gold))},
                groups=lambda s: [s.data["task"]],
                info={"source": "gemmalab.data.instruct held-out split", "heldout": heldout, "seed": seed, "tasks": tasks,
                      "format": "Gemma dialogue, greedy, exact match after trimming"})
