"""Filters for supervised fine-tuning dialogues, as the Gemma report lists them: personal data, unsafe or toxic
responses, mistaken self-identification, duplicates, and length limits. `filter_dialogues` returns the kept
dialogues and a report whose counts reconcile: dialogues in = kept + the dropped ones of every reason.

Checks run in this order and a dialogue is counted once, under the first that drops it: length, personal data
(gemmalab.pii, any turn), toxicity (alt-profanity-check on each line of the model's turns, and a block list),
self-identification (the model's turns claiming to be another assistant, or to be made by another company),
exact duplicates (normalised text), near duplicates (MinHash LSH over character 5-grams, datasketch).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gemmalab import pii
from gemmalab.errors import GemmalabError

__all__ = ["IdentityConfig", "SFTFilterConfig", "FilterReport", "filter_dialogues", "misidentifies"]

Dialogue = tuple[str, list[dict]]  # (where it came from, messages)


@dataclass
class IdentityConfig:
    """Who the tuned model is. The model's turns may say they are `name` made by `maker`; they may not claim to be
    any of `other_names` or made by any of `other_makers` (mentions in the third person are fine)."""

    name: str = "Gemma"
    maker: str = "Google"
    other_names: list[str] = field(default_factory=lambda: [
        "ChatGPT", "GPT-3", "GPT-3.5", "GPT-4", "GPT-4o", "GPT", "Claude", "Bard", "Gemini", "LLaMA", "Llama", "Mistral",
        "Mixtral", "Qwen", "DeepSeek", "Grok", "Copilot", "Ernie", "Vicuna", "Alpaca", "Falcon", "Phi", "Command R"])
    other_makers: list[str] = field(default_factory=lambda: [
        "OpenAI", "Anthropic", "Meta AI", "Meta", "Facebook", "Microsoft", "Mistral AI", "Alibaba", "DeepSeek", "xAI",
        "Baidu", "Cohere", "Amazon", "Apple", "Perplexity", "Stability AI", "TII"])

    def __post_init__(self) -> None:
        if not self.name.strip() or not self.maker.strip():
            raise GemmalabError("`name` and `maker` must be non-empty")


@dataclass
class SFTFilterConfig:
    """`[data.filters]` of an SFT config."""

    min_response_chars: int = 1  # every model turn at least this long (stripped)
    max_chars: int = 32_000  # the whole dialogue's text
    pii: bool = True  # drop dialogues with personal data in any turn
    pii_kinds: list[str] = field(default_factory=lambda: list(pii.KINDS))
    phone_region: str = "US"
    toxicity: bool = True
    toxic_line_threshold: float = 0.8  # a model-turn line scored at least this drops the dialogue
    blocklist: list[str] = field(default_factory=list)  # whole words, any case, in a model turn
    identity: IdentityConfig | None = field(default_factory=IdentityConfig)  # false: no self-identification filter
    exact_dedup: bool = True
    near_dedup: bool = True
    near_threshold: float = 0.8  # estimated Jaccard similarity of character 5-grams
    num_perm: int = 128

    def __post_init__(self) -> None:
        unknown = set(self.pii_kinds) - set(pii.KINDS)
        if unknown:
            raise GemmalabError(f"`pii_kinds` has unknown kinds {sorted(unknown)}; known: {list(pii.KINDS)}")
        if not 0 < self.near_threshold <= 1 or not 0 < self.toxic_line_threshold <= 1:
            raise GemmalabError("`near_threshold` and `toxic_line_threshold` must be in (0, 1]")
        if self.min_response_chars < 0 or self.max_chars < 1:
            raise GemmalabError("`min_response_chars` must be >= 0 and `max_chars` >= 1")


@dataclass
class FilterReport:
    """Counts per reason (in the order the checks run) and up to five examples (file, line) of each."""

    dialogues_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < 5:
            seen.append(where)

    @property
    def reconciled(self) -> bool:
        return self.dialogues_in == self.kept + sum(self.dropped.values())

    def to_dict(self) -> dict:
        return {"dialogues_in": self.dialogues_in, "kept": self.kept, "dropped": dict(self.dropped),
                "reconciled": self.reconciled, "examples": dict(self.examples)}


def _alternation(names: list[str]) -> str:
    return "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))


def _identity_patterns(cfg: IdentityConfig) -> list[re.Pattern]:
    """First-person claims of another identity or maker (the configured ones are left out of the lists)."""
    own = {cfg.name.lower(), cfg.maker.lower()}
    names = _alternation([n for n in cfg.other_names if n.lower() not in own])
    makers = _alternation([m for m in cfg.other_makers if m.lower() not in own])
    me = r"(?:I\s+am|I'm|I’m|my\s+name\s+is|you(?:'re|\s+are)\s+(?:talking|chatting|speaking)\s+(?:to|with))"
    kind = r"(?:an?\s+)?(?:large\s+)?(?:AI\s+)?(?:language\s+)?(?:assistant|model|chatbot)"
    made = r"(?:created|made|trained|developed|built|designed|programmed|fine-tuned|released)"
    patterns = []
    if names:
        patterns.append(rf"\b{me}\s+(?:called\s+|named\s+)?(?:{kind}\s+(?:called|named)\s+)?(?:{names})(?![\w-])")
        patterns.append(rf"\b(?:I|I'm|I am)\s+(?:am\s+)?(?:based\s+on|built\s+on|a\s+version\s+of)\s+(?:{names})(?![\w-])")
    if makers:
        patterns.append(rf"\b(?:I\s+was|I've\s+been|I\s+have\s+been|I\s+am|I'm|I’m)\s+(?:\w+\s+)?{made}\s+by\s+"
                        rf"(?:the\s+(?:team|folks|researchers)\s+at\s+)?(?:{makers})(?![\w-])")
        patterns.append(rf"\bas\s+{kind}\s+(?:\w+\s+){{0,3}}?{made}\s+by\s+(?:{makers})(?![\w-])")
        patterns.append(rf"\b(?:I\s+am|I'm|I’m)\s+{kind}\s+(?:from|by)\s+(?:{makers})(?![\w-])")
        patterns.append(rf"\bmy\s+(?:creators?|developers?|makers?)\s+(?:is|are|at)\s+(?:{makers})(?![\w-])")
    return [re.compile(p, re.IGNORECASE) for p in patterns]


def misidentifies(text: str, cfg: IdentityConfig, patterns: list[re.Pattern] | None = None) -> str | None:
    """The first claim in `text` of another identity or maker (the matched words), or None."""
    for p in patterns if patterns is not None else _identity_patterns(cfg):
        m = p.search(text)
        if m:
            return m.group(0)
    return None


def _model_turns(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] in ("model", "assistant")]


def _normalized(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {' '.join(m['content'].lower().split())}" for m in messages)


def filter_dialogues(dialogues: list[Dialogue], cfg: SFTFilterConfig) -> tuple[list[Dialogue], FilterReport]:
    """The dialogues that pass every check, in their order, and the report (see the module docstring)."""
    report = FilterReport(dialogues_in=len(dialogues))
    identity = _identity_patterns(cfg.identity) if cfg.identity is not None else []
    terms = [re.escape(t.strip()) for t in cfg.blocklist if t.strip()]
    block = re.compile(r"(?i)(?<!\w)(?:" + "|".join(terms) + r")(?!\w)") if terms else None
    toxic = _toxic_dialogues(dialogues, cfg.toxic_line_threshold) if cfg.toxicity else set()
    seen: set[str] = set()
    lsh = None
    if cfg.near_dedup:
        from datasketch import MinHashLSH

        # candidates from LSH tuned below the threshold, then confirmed by their estimated Jaccard similarity
        lsh = MinHashLSH(threshold=max(0.05, cfg.near_threshold - 0.2), num_perm=cfg.num_perm)
        signatures = {}
    kept = []
    for i, (where, messages) in enumerate(dialogues):
        answers = _model_turns(messages)
        text = "\n".join(m["content"] for m in messages)
        reason = None
        if len(text) > cfg.max_chars:
            reason = "too_long"
        elif not answers or min(len(a.strip()) for a in answers) < cfg.min_response_chars:
            reason = "empty_response"
        elif cfg.pii and any(pii.find_pii(m["content"], tuple(cfg.pii_kinds), cfg.phone_region) for m in messages):
            reason = "personal_data"
        elif i in toxic or (block is not None and any(block.search(a) for a in answers)):
            reason = "toxic_response"
        elif identity and any(misidentifies(a, cfg.identity, identity) for a in answers):
            reason = "self_identification"
        else:
            key = _normalized(messages)
            if cfg.exact_dedup and key in seen:
                reason = "exact_duplicate"
            elif lsh is not None:
                signature = _minhash(key, cfg.num_perm)
                if any(signature.jaccard(signatures[j]) >= cfg.near_threshold for j in lsh.query(signature)):
                    reason = "near_duplicate"
                else:
                    lsh.insert(i, signature)
                    signatures[i] = signature
            seen.add(key)
        if reason is None:
            kept.append((where, messages))
        else:
            report.drop(reason, where)
    report.kept = len(kept)
    return kept, report


def _toxic_dialogues(dialogues: list[Dialogue], threshold: float) -> set[int]:
    """Indices of dialogues with a model-turn line the profanity classifier scores >= threshold (one batched call)."""
    from gemmalab.data.filters import profanity_scores

    owners, lines = [], []
    for i, (_, messages) in enumerate(dialogues):
        for answer in _model_turns(messages):
            for line in answer.split("\n"):
                if any(c.isalpha() for c in line):
                    owners.append(i)
                    lines.append(line)
    if not lines:
        return set()
    return {i for i, score in zip(owners, profanity_scores(lines)) if score >= threshold}


def _minhash(text: str, num_perm: int):
    """MinHash of the text's character 5-grams (dialogues are short: one changed word moves few of them)."""
    from datasketch import MinHash

    shingles = {text[j:j + 5] for j in range(max(1, len(text) - 4))}
    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch([s.encode("utf-8") for s in shingles])
    return m
