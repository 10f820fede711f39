"""Exact and MinHash near-duplicate removal with datatrove's own dedup steps.

Exact: datatrove's ExactDedupSignature -> ExactFindDedups -> ExactDedupFilter on a normalised
text (lowercase, whitespace collapsed). Near: datatrove's MinhashDedupSignature ->
MinhashDedupBuckets -> MinhashDedupCluster -> MinhashDedupFilter on word 5-grams.

Two things we add: a whitespace word tokenizer (datatrove's English tokenizer is spaCy's, an
extra package; MinHash text is already lowercased and stripped of punctuation, so whitespace
splitting loses nothing), and `CountingDedup`, which wraps a stock filter step to count what it
drops by source, for the data card.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from gemmalab.data.filters import doc_source, stat_label

__all__ = ["DedupConfig", "WhitespaceWordTokenizer", "CountingDedup", "exact_config", "minhash_config",
           "normalized_text", "lsh_threshold", "lsh_match_probability"]


@dataclass
class DedupConfig:
    """Deduplication settings.

    MinHash LSH with `num_buckets` bands of `hashes_per_bucket` rows: two documents of word-5-gram
    Jaccard s become candidates with probability 1 - (1 - s^r)^b. The defaults (14 x 8, FineWeb's)
    keep s = 0.8 pairs with p = 0.92 and put the S-curve's midpoint near 0.72.
    """

    exact: bool = True
    minhash: bool = True
    ngram: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1
    # datatrove normalises every number to 0 before shingling; templated math problems that differ
    # only in their numbers would then all be one cluster, so numbers count by default here.
    normalize_numbers: bool = False


def lsh_match_probability(similarity: float, num_buckets: int, hashes_per_bucket: int) -> float:
    """P(two documents of Jaccard `similarity` share at least one LSH bucket)."""
    return 1.0 - (1.0 - similarity**hashes_per_bucket) ** num_buckets


def lsh_threshold(num_buckets: int, hashes_per_bucket: int) -> float:
    """The usual approximation of the LSH S-curve's midpoint: (1/b)^(1/r)."""
    return (1.0 / num_buckets) ** (1.0 / hashes_per_bucket)


class WhitespaceWordTokenizer(WordTokenizer):
    """Words = whitespace-separated tokens; sentences = lines. No model, no download."""

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in text.split("\n") if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(m.start(), m.end()) for m in re.finditer(r"[^\n]+", text)]

    # lru_cache in datatrove's load_word_tokenizer hashes its argument: all instances are equal.
    def __hash__(self) -> int:
        return hash(type(self))

    def __eq__(self, other) -> bool:
        return type(other) is type(self)


_WS = re.compile(r"\s+")


def normalized_text(doc: Document) -> bytes:
    """What exact dedup compares: lowercased text with whitespace runs collapsed, UTF-8."""
    return _WS.sub(" ", doc.text.lower()).strip().encode("utf-8")


# datatrove picks its hash function from the getter's return annotation (a type, not a string).
normalized_text.__annotations__["return"] = bytes


def exact_config() -> ExactDedupConfig:
    """datatrove's exact-dedup config on `normalized_text`."""
    return ExactDedupConfig(content_getter=normalized_text)


def minhash_config(cfg: DedupConfig) -> MinhashConfig:
    """datatrove's MinHash config from ours."""
    # sha1: datatrove's xxhash path passes str to xxhash 4, which only hashes bytes.
    return MinhashConfig(n_grams=cfg.ngram, num_buckets=cfg.num_buckets, hashes_per_bucket=cfg.hashes_per_bucket,
                         seed=cfg.seed, hash_config=HashConfig(precision=64, hash_fc="sha1"),
                         norm_config=TextNormConfig(norm_numbers=cfg.normalize_numbers))


class CountingDedup(PipelineStep):
    """Runs a stock datatrove dedup filter step and counts the documents it removed, per source.

    The inner step pulls documents one by one and yields the survivors in order, so every document
    pulled before the next survivor was removed.
    """

    type = "🫂 - DEDUP"

    def __init__(self, inner: PipelineStep, reason: str):
        self.name = f"🧮 gemmalab {reason} ({inner.name})"  # before super(): datatrove names stats by it
        super().__init__()
        self.inner = inner
        self.reason = reason

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        pending: deque[Document] = deque()

        def tap():
            for doc in data:
                pending.append(doc)
                yield doc

        for doc in self.inner.run(tap(), rank, world_size):
            while pending and pending[0] is not doc:
                self._count(pending.popleft())
            pending.popleft()
            self.stat_update("forwarded")
            yield doc
        while pending:
            self._count(pending.popleft())

    def _count(self, doc: Document) -> None:
        self.stat_update("dropped", stat_label("drop", "dedup", self.reason, doc_source(doc)))
