"""Preference pairs for the reward model: JSONL files, the built-in pairs made from the checkable tasks, and their
rendering as token ids.

A line is `{"prompt", "chosen", "rejected", "margin"?}`: the prompt a string or a message list, the answers strings;
or HH style, `chosen` and `rejected` full dialogues (message lists) that share every message but the last model
turn. Bad lines are reported (file, line, what) and counted, never fatal.

The reward model reads its head at the `<end_of_turn>` closing the answer: `scored_ids` renders the prompt and the
answer in the dialogue format and ends there. RLHF scores prompt ids + sampled ids + `<end_of_turn>`, the same ids.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gemmalab.data.dialogue import parse_dialogue
from gemmalab.data.instruct import CHATTER, TASKS, WORDS, BuiltinTasks, builtin_dialogues, is_correct
from gemmalab.errors import GemmalabError
from gemmalab.files import jsonl_lines

__all__ = ["Preference", "BuiltinPreferences", "REJECTED_KINDS", "Sampler", "read_preferences",
           "builtin_preferences", "scored_ids", "render_pair"]

REJECTED_KINDS = ("wrong", "truncated", "badly_formatted", "sampled")

# prompts (message lists) and an attempt number -> one sampled answer per prompt (gemmalab.train.reward: a model's)
Sampler = Callable[[list[list[dict]], int], list[str]]


@dataclass
class Preference:
    """One pair: the messages before the answer, the preferred and the rejected answer."""

    prompt: list[dict]
    chosen: str
    rejected: str
    where: str = ""
    margin: float = 0.0  # the loss wants r_chosen - r_rejected above this (Llama 2's margin)
    kind: str = ""  # how the rejected answer is bad (built-in pairs), for reports


def _messages(value, field_name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        try:
            return parse_dialogue({"messages": value})
        except GemmalabError as e:
            raise GemmalabError(f'"{field_name}": {e}') from None
    raise GemmalabError(f'"{field_name}" must be a string or a list of messages, got {type(value).__name__}')


def parse_preference(obj: dict, where: str = "") -> Preference:
    """The Preference of one JSONL object; a GemmalabError names the field that is wrong."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise GemmalabError(f'missing "{key}"')
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise GemmalabError(f'"margin" must be a number, got {margin!r}')
    chosen, rejected = obj["chosen"], obj["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):  # HH style: two dialogues, one prompt
        c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        for name, msgs in (("chosen", c), ("rejected", r)):
            if msgs[-1]["role"] != "model":
                raise GemmalabError(f'the last message of "{name}" must be a model turn')
        if c[:-1] != r[:-1]:
            raise GemmalabError('"chosen" and "rejected" must share every message before their last model turn')
        prompt = c[:-1] if "prompt" not in obj else _messages(obj["prompt"], "prompt")
        return Preference(prompt, c[-1]["content"], r[-1]["content"], where, float(margin))
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise GemmalabError('"chosen" and "rejected" must both be strings or both be message lists')
    if "prompt" not in obj:
        raise GemmalabError('missing "prompt"')
    prompt = _messages(obj["prompt"], "prompt")
    if prompt[-1]["role"] == "model":
        raise GemmalabError('the last message of "prompt" must be the user\'s')
    return Preference(prompt, chosen, rejected, where, float(margin))


def read_preferences(path: str | Path) -> Iterator[tuple[str, Preference | None, str | None]]:
    """(where, preference, problem) for each non-blank line of a JSONL file (.gz, .zst too): the pair, or None and
    what is wrong ("file, line 7: ...")."""
    for n, obj, problem in jsonl_lines(path):
        where = f"{path}, line {n}"
        if problem is None:
            try:
                yield where, parse_preference(obj, where), None
                continue
            except GemmalabError as e:
                problem = str(e)
        yield where, None, f"{where}: {problem}"


# ---- built-in pairs ----------------------------------------------------------------------------------------------


@dataclass
class BuiltinPreferences:
    """`[data.builtin]` of a reward config: pairs made from the checkable tasks (gemmalab.data.instruct), the right
    answer preferred over a wrong, a truncated or a badly formatted one, or (kind "sampled") over a wrong answer the
    model itself gives (the errors a policy starting from that model makes). The split is the tasks' own (no prompt
    in both), so the same seed as the SFT run keeps its held-out prompts held out."""

    train: int = 4000
    heldout: int = 200
    seed: int = 0
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    kinds: list[str] = field(default_factory=lambda: ["wrong", "truncated", "badly_formatted"])
    sample_attempts: int = 4  # "sampled": answers drawn per prompt until one is wrong (else a made-up wrong one)
    sample_tokens: int = 32  # "sampled": new tokens at most per answer

    def __post_init__(self) -> None:
        BuiltinTasks(self.train, self.heldout, self.seed, self.tasks)  # validates
        if not self.kinds or set(self.kinds) - set(REJECTED_KINDS):
            raise GemmalabError(f"`kinds` must name some of {', '.join(REJECTED_KINDS)}, got {self.kinds}")
        if self.sample_attempts < 1 or self.sample_tokens < 1:
            raise GemmalabError("`sample_attempts` and `sample_tokens` must be >= 1")


def _wrong(answer: str, r: random.Random, prompt: str = "") -> str:
    """A plausible wrong answer of the same shape: another number (the other one offered, when the prompt offers two),
    the other of yes/no, another word (one of the prompt's, when it lists some), another order."""
    offered = re.findall(r"\b\d+\b", prompt)
    if len(offered) == 2 and answer in offered and offered[0] != offered[1]:
        return offered[1] if answer == offered[0] else offered[0]
    listed = [w for w in re.findall(r"[a-z]+", prompt) if w in WORDS and w != answer]
    if answer in WORDS and listed:
        return r.choice(listed)
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    if answer.lstrip("-").isdigit():
        return str(int(answer) + r.choice([-2, -1, 1, 2]))
    if answer.startswith("[") and answer.endswith("]"):
        return f"[{r.choice([w for w in WORDS if w != answer[1:-1]])}]"
    parts = answer.split(", ")
    if len(parts) > 1:
        shuffled = parts[:]
        while shuffled == parts:
            r.shuffle(shuffled)
        return ", ".join(shuffled)
    return r.choice([w for w in WORDS if w != answer])


def _truncated(answer: str, r: random.Random) -> str | None:
    """A strict prefix of the answer (None when it is too short to cut)."""
    parts = answer.split(", ")
    if len(parts) > 1:
        return ", ".join(parts[:r.randint(1, len(parts) - 1)])
    if len(answer) >= 3:
        return answer[:r.randint(1, len(answer) - 1)]
    return None


def _rejected(answer: str, kind: str, r: random.Random, prompt: str) -> tuple[str, str]:
    if kind == "truncated":
        cut = _truncated(answer, r)
        if cut is not None:
            return cut, kind
        kind = "wrong"
    if kind == "badly_formatted":
        return r.choice(CHATTER).format(a=answer), kind
    return _wrong(answer, r, prompt), "wrong"


def builtin_preferences(cfg: BuiltinPreferences, sample: Sampler | None = None
                        ) -> tuple[list[Preference], list[Preference]]:
    """(train, held-out) pairs: each example of the built-in tasks' split with a seeded rejected answer of a kind
    drawn from `kinds`; every rejected answer fails the task's check. Kind "sampled" takes the first wrong answer of
    `sample` in `sample_attempts` tries (a made-up wrong one, counted as "wrong", when every try was right)."""
    if "sampled" in cfg.kinds and sample is None:
        raise GemmalabError('`kinds` has "sampled": the pairs need a model to sample answers from')
    train, heldout = builtin_dialogues(BuiltinTasks(cfg.train, cfg.heldout, cfg.seed, cfg.tasks))
    out = []
    for name, examples in (("train", train), ("heldout", heldout)):
        r = random.Random(f"preferences/{cfg.seed}/{name}")  # the held-out pairs do not depend on `train`
        drawn = [r.choice(cfg.kinds) for _ in examples]
        to_sample = [i for i, k in enumerate(drawn) if k == "sampled"]
        sampled = dict(zip(to_sample, _sampled_wrong([examples[i] for i in to_sample], sample, cfg.sample_attempts)))
        pairs = []
        for i, (e, kind) in enumerate(zip(examples, drawn)):
            if sampled.get(i) is not None:
                rejected = sampled[i]
            else:
                rejected, kind = _rejected(e["answer"], "wrong" if kind == "sampled" else kind, r, e["prompt"])
            assert not is_correct(rejected, e["answer"]), (e, rejected)
            pairs.append(Preference(e["messages"][:-1], e["answer"], rejected, f"builtin:{name}:{e['task']}:{i}",
                                    kind=kind))
        out.append(pairs)
    return out[0], out[1]


def _sampled_wrong(examples: list[dict], sample: Sampler | None, attempts: int) -> list[str | None]:
    """Per example, the first sampled answer that fails its check (None: every attempt was right or empty)."""
    found: list[str | None] = [None] * len(examples)
    for attempt in range(attempts):
        todo = [i for i, f in enumerate(found) if f is None]
        if not todo:
            break
        answers = sample([examples[i]["messages"][:-1] for i in todo], attempt)
        for i, a in zip(todo, answers):
            if a.strip() and not is_correct(a, examples[i]["answer"]):
                found[i] = a
    return found


# ---- ids -------------------------------------------------------------------------------------------------------


def scored_ids(tokenizer, prompt: list[dict], answer: str) -> list[int]:
    """The ids a reward model scores: the prompt and the answer in the dialogue format, ending with the answer's
    `<end_of_turn>` (where the head is read)."""
    ids, _ = tokenizer.chat_ids_and_mask(prompt + [{"role": "model", "content": answer}], add_generation_prompt=False)
    end = len(ids) - 1 - ids[::-1].index(tokenizer.end_of_turn_id)
    return ids[:end + 1]


def render_pair(tokenizer, pref: Preference, max_tokens: int) -> tuple[list[int], list[int]] | str:
    """(chosen ids, rejected ids), each cut to `max_tokens` (the prompt is kept; the answer's end goes), or why the pair
    is dropped: "identical" (the same answer twice), "prompt_too_long" (no room for an answer), or
    "identical_after_truncation" (the cut removed every difference: the pair would teach nothing)."""
    from gemmalab.tokenizer import TokenizerError

    if pref.chosen.strip() == pref.rejected.strip():
        return "identical"
    try:
        chosen, rejected = scored_ids(tokenizer, pref.prompt, pref.chosen), scored_ids(tokenizer, pref.prompt, pref.rejected)
        prompt_len = len(tokenizer.apply_chat_template(pref.prompt, add_generation_prompt=True))
    except TokenizerError:
        return "invalid_roles"
    if prompt_len >= max_tokens:
        return "prompt_too_long"
    chosen, rejected = chosen[:max_tokens], rejected[:max_tokens]
    if chosen == rejected:
        return "identical_after_truncation"
    return chosen, rejected
