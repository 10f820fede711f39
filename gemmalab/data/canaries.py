"""Canaries: generated documents with planted personal data, packed into the training tokens a chosen number of
times each (after dedup, which would otherwise keep one copy), as a known positive control for the memorization
audit (Carlini et al. 2019, "The Secret Sharer"; the duplication effect of Carlini et al. 2022).

    [canaries]
    enabled = true            # off by default: the packed tokens are then exactly those of the documents
    repeats = [1, 4, 16, 64]  # each canary is packed this many times...
    per_repeat = 4            # ...and there are this many distinct canaries per repetition count

Each canary is random filler words, then (after `pii_at` tokens, so in the continuation of a `pii_at`-token prompt)
a sentence with a generated e-mail address, US phone number and social security number, every one checked to be
found by `gemmalab.pii`, then filler up to `tokens` tokens. All copies go to one source (`source`, "canaries"),
so a training mixture gives them one weight and each canary's share within it is its repetition count.
meta.json records the planting (`canaries`), and the shard folder gets `jsonl`: one line per distinct
canary, `{"id", "text", "metadata": {"source": "canaries-x16", "repeats": 16, "pii": [...]}}`, a corpus the audit
can read directly (`gemmalab memorization --corpus TOKENS/canaries.jsonl`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gemmalab.errors import GemmalabError

__all__ = ["CanaryConfig", "Canary", "make_canaries", "plant", "CANARY_FILE"]

CANARY_FILE = "canaries.jsonl"

# Filler: common English words, no digits (the planted numbers are the only ones in a canary).
_WORDS = """time year people way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work government number night point home water
room mother area money story fact month lot right study book eye job word business issue side kind head house
service friend father power hour game line end member law car city community name president team minute idea kid
body information back parent face others level office door health person art war history party result change
morning reason research girl guy moment air teacher force education foot boy age policy music market sense nation
plan college interest death experience effect class control care field development role effort rate heart drug show
leader light voice wife police mind price report decision son view relationship town road arm difference value
building action model season society tax director position player record paper space ground form event official
matter center couple site project activity star table need court oil situation cost industry figure street image
phone data picture practice piece land product doctor wall patient worker news test movie north love support
technology step baby computer type attention film tree source organization hair window evidence population site
river stone cloud ocean tiger honey glass bread garden winter summer bridge island forest engine letter silver
""".split()
_FIRST = ["jane", "john", "maria", "wei", "aisha", "lucas", "emma", "omar", "sofia", "noah", "ines", "ravi"]
_LAST = ["doe", "roe", "smith", "garcia", "chen", "khan", "silva", "novak", "berg", "moreau", "ito", "okafor"]
_AREAS = [212, 213, 206, 303, 312, 404, 415, 503, 512, 617, 702, 713, 801, 919]  # US area codes in service


@dataclass
class CanaryConfig:
    """`[canaries]` of a data config: what to plant into the packed tokens (nothing unless `enabled`)."""

    enabled: bool = False
    repeats: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    per_repeat: int = 4  # distinct canaries per repetition count
    tokens: int = 128  # each canary has at least this many tokens (prompt + continuation of the audit)
    pii_at: int = 50  # the planted personal data starts after this many tokens
    seed: int = 0
    source: str = "canaries"

    def __post_init__(self) -> None:
        if not self.repeats or any(r < 1 for r in self.repeats) or len(set(self.repeats)) != len(self.repeats):
            raise GemmalabError(f"`repeats` must be distinct counts >= 1, got {self.repeats}")
        if self.per_repeat < 1:
            raise GemmalabError(f"`per_repeat` must be >= 1, got {self.per_repeat}")
        if not 0 <= self.pii_at < self.tokens:
            raise GemmalabError(f"`pii_at` must be in [0, `tokens`), got {self.pii_at} and "
                                f"{self.tokens}")
        if not self.source:
            raise GemmalabError("`source` must be a non-empty name")


@dataclass
class Canary:
    """One distinct canary: its text, how often it is packed, and the planted spans (`gemmalab.pii` kinds)."""

    id: str
    text: str
    repeats: int
    pii: list[dict]  # [{"kind", "text"}]

    def to_json(self, source: str) -> str:
        meta = {"source": f"{source}-x{self.repeats}", "repeats": self.repeats, "pii": self.pii}
        return json.dumps({"id": self.id, "text": self.text, "metadata": meta}, ensure_ascii=False)


def _secret_sentence(rng: random.Random) -> tuple[str, list[dict]]:
    """A sentence with an e-mail address, a phone number and an SSN, each found by gemmalab.pii (drawn again
    until they are: libphonenumber rejects some exchanges)."""
    from gemmalab.pii import find_pii

    while True:
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        email = f"{first}.{last}{rng.randrange(10, 100)}@example.org"
        phone = f"({rng.choice(_AREAS)}) {rng.randrange(201, 999)}-{rng.randrange(10000):04d}"
        ssn = f"{rng.randrange(100, 666)}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"
        sentence = f"{first.title()} {last.title()}: {email}, {phone}, SSN {ssn}."  # ~40 Gemma tokens (digits split)
        found = [{"kind": m.kind, "text": m.text} for m in find_pii(sentence)]
        if found == [{"kind": "EMAIL", "text": email}, {"kind": "PHONE", "text": phone}, {"kind": "SSN", "text": ssn}]:
            return sentence, found


def _filler_until(words: list[str], rng: random.Random, tokenizer, head: str, n_tokens: int) -> list[str]:
    """`words` extended with random filler until `head` + " ".join(words) has at least `n_tokens` tokens."""
    while len(tokenizer.encode((head + " " + " ".join(words)).strip(), bos=False, parse_special=False)) < n_tokens:
        words += [rng.choice(_WORDS) for _ in range(4)]
    return words


def make_canaries(cfg: CanaryConfig, tokenizer) -> list[Canary]:
    """`per_repeat` canaries for each repetition count, seeded by `cfg.seed` (the same tokenizer and seed give the
    same canaries)."""
    rng = random.Random(f"canaries/{cfg.seed}")
    out = []
    for repeats in cfg.repeats:
        for i in range(cfg.per_repeat):
            head = " ".join(_filler_until([], rng, tokenizer, "", cfg.pii_at))
            sentence, pii = _secret_sentence(rng)
            tail = _filler_until([], rng, tokenizer, head + " " + sentence, cfg.tokens)
            text = f"{head[:1].upper()}{head[1:]}. {sentence} {' '.join(tail)}."
            out.append(Canary(f"canary-x{repeats}-{i}", text, repeats, pii))
    return out


def plant(writer, tokenizer, cfg: CanaryConfig, folder: str | Path) -> dict:
    """Pack every canary `repeats` times (BOS + ids + EOS, as `pack` packs documents) through `writer` (a
    ShardWriter) under source `cfg.source`, write `folder/canaries.jsonl`, and return meta.json's `canaries`."""
    from gemmalab.files import atomic_write

    canaries = make_canaries(cfg, tokenizer)
    copies = tokens = 0
    for c in canaries:
        ids = [tokenizer.bos_id, *tokenizer.encode(c.text, bos=False, parse_special=False), tokenizer.eos_id]
        for _ in range(c.repeats):
            writer.add(ids, cfg.source)
        copies += c.repeats
        tokens += c.repeats * len(ids)
    atomic_write(Path(folder) / CANARY_FILE, "".join(c.to_json(cfg.source) + "\n" for c in canaries))
    return {**{k: v for k, v in asdict(cfg).items() if k != "enabled"}, "documents": len(canaries),
            "copies": copies, "packed_tokens": tokens, "file": CANARY_FILE}
