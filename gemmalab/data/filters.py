"""Gemma-specific datatrove filter steps: safety, PII, language, quality and decontamination.

Every step is a datatrove `BaseFilter`, so it runs under any datatrove executor (local, Slurm,
Ray). Each records, through datatrove's `stat_update`, what it drops by reason *and* by source
(labels `gl|drop|<filter>|<reason>|<source>`); `gemmalab.data.card` turns those into the data card.

Everything runs offline: the toxicity model ships inside `alt-profanity-check`, the language model
inside `py3langid`, and the Gopher heuristics are ours (datatrove's Gopher filters tokenise words
with spaCy; ours split on whitespace and need no extra package).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from datatrove.data import Document
from datatrove.io import get_datafolder
from datatrove.pipeline.filters.base_filter import BaseFilter

from gemmalab import pii
from gemmalab.errors import GemmalabError
from gemmalab.data.decontam import DecontamConfig, NgramIndex, janitor_split

__all__ = [
    "SourceKinds", "SafetyConfig", "PiiConfig", "LanguageConfig", "QualityThresholds", "QualityConfig",
    "SafetyFilter", "PiiFilter", "LanguageFilter", "QualityFilter", "DecontamFilter",
    "stat_label", "doc_source", "quality_reason", "identify_language",
]

PROSE, CODE, MATH = "prose", "code", "math"
KINDS = (PROSE, CODE, MATH)


def stat_label(*parts: str) -> str:
    """The datatrove stat label of one gemmalab count, e.g. `gl|drop|quality|short_doc|web`."""
    return "|".join(("gl",) + parts)


def doc_source(doc: Document) -> str:
    """The document's source name (`metadata.source`), `unknown` when absent."""
    src = doc.metadata.get("source")
    return src if isinstance(src, str) and src else "unknown"


@dataclass
class SourceKinds:
    """Which kind of text each source holds: prose heuristics must not judge code or math."""

    kinds: dict[str, str] = field(default_factory=lambda: {"code": CODE, "math": MATH})
    default: str = PROSE

    def of(self, doc: Document) -> str:
        return self.kinds.get(doc_source(doc), self.default)


class _CountingFilter(BaseFilter):
    """A BaseFilter whose drops are also counted per source (and which knows its task's rank)."""

    filter_name = "filter"

    def __init__(self, source_kinds: SourceKinds | None = None, batch_size: int = 1):
        super().__init__(batch_size=batch_size)
        self.source_kinds = source_kinds or SourceKinds()
        self.rank = 0

    def drop(self, doc: Document, reason: str) -> tuple[bool, str]:
        self.stat_update(stat_label("drop", self.filter_name, reason, doc_source(doc)))
        return False, f"{self.filter_name}_{reason}"

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.rank = rank
        yield from super().run(data, rank, world_size)


# --- safety ---------------------------------------------------------------------------------


@dataclass
class SafetyConfig:
    """Toxicity filtering.

    Lines the classifier scores >= `line_threshold` are removed; a document with more than
    `max_toxic_line_frac` of its lines toxic is dropped. Any `blocklist` term (case-insensitive,
    whole words) drops the document. `classifier_model` names a *local* transformers
    text-classification model directory (never downloaded); its `toxic_labels` scoring >=
    `classifier_threshold` on the document's start drop it.
    """

    enabled: bool = True
    line_threshold: float = 0.8
    max_toxic_line_frac: float = 0.25
    blocklist: list[str] = field(default_factory=list)
    # Not code by default: the classifier reads `proc.kill()` or `dbm.dumb` as abuse, and removing
    # lines from a program breaks it.
    kinds: list[str] = field(default_factory=lambda: [PROSE, MATH])
    classifier_model: str | None = None
    toxic_labels: list[str] = field(default_factory=lambda: ["toxic", "TOXIC", "LABEL_1"])
    classifier_threshold: float = 0.5


_PROFANITY = None


def profanity_scores(lines: list[str]) -> list[float]:
    """P(offensive) per line, from alt-profanity-check (its model ships in the wheel)."""
    global _PROFANITY
    if _PROFANITY is None:
        from profanity_check import predict_prob  # model ships in the wheel; ~1 s to load

        _PROFANITY = predict_prob
    return [float(p) for p in _PROFANITY(lines)]


def local_transformers_classifier(model_dir: str, labels: list[str]) -> Callable[[list[str]], list[float]]:
    """A scorer from a local transformers text-classification model: P(any toxic label) per text."""
    from transformers import pipeline

    clf = pipeline("text-classification", model=model_dir, top_k=None, truncation=True,
                   model_kwargs={"local_files_only": True})

    def score(texts: list[str]) -> list[float]:
        return [sum(s["score"] for s in out if s["label"] in labels) for out in clf(texts)]

    return score


class SafetyFilter(_CountingFilter):
    """Drops toxic lines and documents (alt-profanity-check), block-listed terms, optional classifier.

    `doc_classifier` (texts -> toxic probability) overrides `config.classifier_model`; it is the
    hook for any local model. It runs in the worker, so with Ray or Slurm it must be picklable.
    """

    name = "🛡 gemmalab safety"
    filter_name = "safety"

    def __init__(self, config: SafetyConfig, source_kinds: SourceKinds | None = None,
                 doc_classifier: Callable[[list[str]], list[float]] | None = None, batch_size: int = 64):
        # Batches: one classifier call for the lines of many documents (sklearn's per-call cost dominates).
        super().__init__(source_kinds, batch_size=batch_size)
        self.config = config
        self.doc_classifier = doc_classifier
        terms = [re.escape(t.strip()) for t in config.blocklist if t.strip()]
        self._block = re.compile(r"(?i)(?<!\w)(?:" + "|".join(terms) + r")(?!\w)") if terms else None

    def _classifier(self):
        if self.doc_classifier is None and self.config.classifier_model:
            self.doc_classifier = local_transformers_classifier(self.config.classifier_model, self.config.toxic_labels)
        return self.doc_classifier

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        results: list[bool | tuple[bool, str] | None] = [None] * len(batch)
        pending = []  # (position in batch, lines, indices of lines worth scoring)
        for i, doc in enumerate(batch):
            if self.source_kinds.of(doc) not in self.config.kinds:
                results[i] = True
            elif self._block is not None and self._block.search(doc.text):
                results[i] = self.drop(doc, "blocklist")
            else:
                lines = doc.text.split("\n")
                pending.append((i, lines, [j for j, line in enumerate(lines) if any(c.isalpha() for c in line)]))
        flat = [lines[j] for _, lines, idx in pending for j in idx]
        scores = profanity_scores(flat) if flat else []
        pos = 0
        for i, lines, idx in pending:
            results[i] = self._judge(batch[i], lines, idx, scores[pos : pos + len(idx)])
            pos += len(idx)
        return results

    def _judge(self, doc: Document, lines: list[str], idx: list[int], scores: list[float]):
        toxic = {j for j, s in zip(idx, scores) if s >= self.config.line_threshold}
        if toxic:
            if len(toxic) / len(idx) > self.config.max_toxic_line_frac:
                return self.drop(doc, "toxic_doc")
            self.stat_update(stat_label("toxic_lines_removed", doc_source(doc)), value=len(toxic))
            doc.text = "\n".join(line for j, line in enumerate(lines) if j not in toxic)
            if not doc.text.strip():
                return self.drop(doc, "toxic_doc")
        clf = self._classifier()
        if clf is not None and clf([doc.text[:4000]])[0] >= self.config.classifier_threshold:
            return self.drop(doc, "classifier")
        return True


# --- PII ------------------------------------------------------------------------------------


@dataclass
class PiiConfig:
    """PII handling: `mode` "redact" (typed placeholders) or "drop" (the whole document)."""

    enabled: bool = True
    mode: str = "redact"
    kinds: list[str] = field(default_factory=lambda: list(pii.KINDS))
    phone_region: str = "US"

    def __post_init__(self) -> None:
        if self.mode not in ("redact", "drop"):
            raise GemmalabError(f"`mode` = {self.mode!r}; choose 'redact' or 'drop'")


class PiiFilter(_CountingFilter):
    """Redacts PII with typed placeholders, or drops documents that contain any (see gemmalab.pii)."""

    name = "🔏 gemmalab PII"
    filter_name = "pii"

    def __init__(self, config: PiiConfig, source_kinds: SourceKinds | None = None):
        super().__init__(source_kinds)
        self.config = config
        self.kinds = tuple(config.kinds)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text, counts = pii.redact(doc.text, self.kinds, self.config.phone_region)
        if not counts:
            return True
        src = doc_source(doc)
        for kind, n in counts.items():
            self.stat_update(stat_label("pii", kind, src), value=n)
        if self.config.mode == "drop":
            return self.drop(doc, "contains_pii")
        self.stat_update(stat_label("pii_redacted_docs", src))
        doc.text = text
        return True


# --- language -------------------------------------------------------------------------------


@dataclass
class LanguageConfig:
    """Language identification with py3langid (model inside the wheel); code and math are exempt."""

    enabled: bool = True
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_score: float = 0.5
    exempt_kinds: list[str] = field(default_factory=lambda: [CODE, MATH])
    sample_chars: int = 2000  # long texts are judged on their start: faster, and py3langid saturates


_LANGID = None


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of `text` with py3langid's bundled model."""
    global _LANGID
    if _LANGID is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _LANGID = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    lang, score = _LANGID.classify(text)
    return lang, float(score)


class LanguageFilter(_CountingFilter):
    """Keeps documents in `languages` (English by default); records the language in metadata."""

    name = "🌍 gemmalab language"
    filter_name = "language"

    def __init__(self, config: LanguageConfig, source_kinds: SourceKinds | None = None):
        super().__init__(source_kinds)
        self.config = config

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self.source_kinds.of(doc) in self.config.exempt_kinds:
            return True
        lang, score = identify_language(doc.text[: self.config.sample_chars])
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        if lang not in self.config.languages or score < self.config.min_score:
            return self.drop(doc, "not_" + "_".join(self.config.languages))
        return True


# --- quality --------------------------------------------------------------------------------


@dataclass
class QualityThresholds:
    """Gopher-style heuristics (Rae et al. 2021, appendix A); None disables a rule."""

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3
    max_mean_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1  # "#" and "..." per word
    max_bullet_lines_frac: float | None = 0.9
    max_ellipsis_lines_frac: float | None = 0.3
    min_alpha_words_frac: float | None = 0.8
    min_stop_words: int | None = 2
    max_dup_line_frac: float | None = 0.3
    max_dup_line_char_frac: float | None = 0.2
    max_dup_para_frac: float | None = 0.3
    max_dup_para_char_frac: float | None = 0.2
    max_top_ngram_char_frac: dict[int, float] | None = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    max_dup_ngram_char_frac: dict[int, float] | None = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    max_mean_line_length: float | None = None  # for code: minified or generated files
    min_alnum_char_frac: float | None = None  # for code: binary blobs, base64 walls


def _code_thresholds() -> QualityThresholds:
    return QualityThresholds(
        min_words=5, max_words=200_000, min_mean_word_length=None, max_mean_word_length=None,
        max_symbol_word_ratio=None, max_bullet_lines_frac=None, max_ellipsis_lines_frac=None,
        min_alpha_words_frac=None, min_stop_words=None, max_dup_line_frac=None, max_dup_line_char_frac=None,
        max_dup_para_frac=None, max_dup_para_char_frac=None, max_top_ngram_char_frac=None,
        max_dup_ngram_char_frac=None, max_mean_line_length=200, min_alnum_char_frac=0.25)


def _math_thresholds() -> QualityThresholds:
    return QualityThresholds(
        min_words=5, max_words=200_000, min_mean_word_length=None, max_mean_word_length=None,
        max_symbol_word_ratio=None, max_bullet_lines_frac=None, max_ellipsis_lines_frac=None,
        min_alpha_words_frac=None, min_stop_words=None, max_dup_line_frac=0.5, max_dup_line_char_frac=None,
        max_dup_para_frac=None, max_dup_para_char_frac=None, max_top_ngram_char_frac=None,
        max_dup_ngram_char_frac=None)


@dataclass
class QualityConfig:
    """Heuristic thresholds per source kind: prose gets Gopher's, code and math their own."""

    enabled: bool = True
    prose: QualityThresholds = field(default_factory=QualityThresholds)
    code: QualityThresholds = field(default_factory=_code_thresholds)
    math: QualityThresholds = field(default_factory=_math_thresholds)

    def for_kind(self, kind: str) -> QualityThresholds:
        return getattr(self, kind)


_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
_PUNCT = frozenset(string.punctuation)
_BULLETS = ("•", "-", "*", "●", "◦", "▪")
_PARA_SPLIT = re.compile(r"\n{2,}")


def _dup_counts(elements: list[str]) -> tuple[int, int]:
    """(number of elements that repeat an earlier one, their characters)."""
    seen: set[str] = set()
    n = chars = 0
    for e in elements:
        if e in seen:
            n += 1
            chars += len(e)
        else:
            seen.add(e)
    return n, chars


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters inside word n-grams that repeat an earlier one (Gopher's non-overlapping count)."""
    seen: set[tuple[str, ...]] = set()
    chars, i, end = 0, 0, len(words) - n + 1
    while i < end:
        g = tuple(words[i : i + n])
        if g in seen:
            chars += sum(len(w) for w in g)
            i += n
        else:
            seen.add(g)
            i += 1
    return chars


def quality_reason(text: str, t: QualityThresholds) -> str | None:
    """The first heuristic `text` fails under thresholds `t`, or None when it passes them all."""
    words = text.split()
    n_words = len(words)
    if t.min_words is not None and n_words < t.min_words:
        return "too_few_words"
    if t.max_words is not None and n_words > t.max_words:
        return "too_many_words"
    if n_words == 0:
        return "too_few_words"
    lines = text.split("\n")
    if t.max_mean_line_length is not None and len(text) / len(lines) > t.max_mean_line_length:
        return "long_lines"
    if t.min_alnum_char_frac is not None:
        alnum = sum(c.isalnum() for c in text)
        if alnum / max(1, len(text)) < t.min_alnum_char_frac:
            return "few_alnum_chars"
    if t.min_mean_word_length is not None or t.max_mean_word_length is not None:
        content = [w for w in words if not all(c in _PUNCT for c in w)]
        mean_len = sum(len(w) for w in content) / len(content) if content else 0.0
        if t.min_mean_word_length is not None and mean_len < t.min_mean_word_length:
            return "short_words"
        if t.max_mean_word_length is not None and mean_len > t.max_mean_word_length:
            return "long_words"
    if t.max_symbol_word_ratio is not None:
        if text.count("#") / n_words > t.max_symbol_word_ratio:
            return "hash_symbols"
        if (text.count("...") + text.count("…")) / n_words > t.max_symbol_word_ratio:
            return "ellipsis_symbols"
    nonempty = [ln for ln in lines if ln.strip()]
    if nonempty:
        if t.max_bullet_lines_frac is not None:
            bullets = sum(ln.lstrip().startswith(_BULLETS) for ln in nonempty)
            if bullets / len(nonempty) > t.max_bullet_lines_frac:
                return "bullet_lines"
        if t.max_ellipsis_lines_frac is not None:
            ell = sum(ln.rstrip().endswith(("...", "…")) for ln in nonempty)
            if ell / len(nonempty) > t.max_ellipsis_lines_frac:
                return "ellipsis_lines"
    if t.min_alpha_words_frac is not None:
        alpha = sum(any(c.isalpha() for c in w) for w in words)
        if alpha / n_words < t.min_alpha_words_frac:
            return "few_alpha_words"
    if t.min_stop_words is not None:
        lower = {w.lower().strip(string.punctuation) for w in words}
        if len(_STOP_WORDS & lower) < t.min_stop_words:
            return "few_stop_words"
    # Repetition (Gopher table A1).
    if nonempty and (t.max_dup_line_frac is not None or t.max_dup_line_char_frac is not None):
        n_dup, c_dup = _dup_counts(nonempty)
        if t.max_dup_line_frac is not None and n_dup / len(nonempty) > t.max_dup_line_frac:
            return "dup_lines"
        if t.max_dup_line_char_frac is not None and c_dup / len(text) > t.max_dup_line_char_frac:
            return "dup_line_chars"
    if t.max_dup_para_frac is not None or t.max_dup_para_char_frac is not None:
        paras = [p for p in _PARA_SPLIT.split(text.strip()) if p.strip()]
        if paras:
            n_dup, c_dup = _dup_counts(paras)
            if t.max_dup_para_frac is not None and n_dup / len(paras) > t.max_dup_para_frac:
                return "dup_paragraphs"
            if t.max_dup_para_char_frac is not None and c_dup / len(text) > t.max_dup_para_char_frac:
                return "dup_paragraph_chars"
    total_chars = sum(len(w) for w in words)
    if t.max_top_ngram_char_frac:
        for n, limit in sorted(t.max_top_ngram_char_frac.items()):
            if n_words < n:
                continue
            counts = Counter(zip(*(words[i:] for i in range(n))))
            gram, c = counts.most_common(1)[0]
            if c > 1 and sum(len(w) for w in gram) * c / total_chars > limit:
                return f"top_{n}gram"
    if t.max_dup_ngram_char_frac:
        for n, limit in sorted(t.max_dup_ngram_char_frac.items()):
            if _dup_ngram_chars(words, n) / total_chars > limit:
                return f"dup_{n}gram"
    return None


class QualityFilter(_CountingFilter):
    """Gopher-style quality heuristics, with thresholds chosen by the source's kind."""

    name = "🥇 gemmalab quality"
    filter_name = "quality"

    def __init__(self, config: QualityConfig, source_kinds: SourceKinds | None = None):
        super().__init__(source_kinds)
        self.config = config

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        reason = quality_reason(doc.text, self.config.for_kind(self.source_kinds.of(doc)))
        return True if reason is None else self.drop(doc, reason)


# --- decontamination ------------------------------------------------------------------------


class DecontamFilter(_CountingFilter):
    """13-gram benchmark decontamination (see gemmalab.data.decontam); writes its hits per task.

    Hits go to `hits_folder/NNNNN.jsonl` (one row per benchmark item and document) for the
    contamination report. `index`: the benchmarks' n-gram index, built once by the caller (it travels to the
    workers with the pipeline); None builds it from `config` in each worker.
    """

    name = "🧪 gemmalab decontamination"
    filter_name = "decontam"

    def __init__(self, config: DecontamConfig, hits_folder: str, source_kinds: SourceKinds | None = None,
                 index: NgramIndex | None = None):
        super().__init__(source_kinds)
        self.config = config
        self.hits_folder = hits_folder
        self._index = index
        self._hits_file = None

    @property
    def index(self) -> NgramIndex:
        if self._index is None:
            self._index = NgramIndex(self.config.benchmarks, self.config.ngram)
        return self._index

    def run(self, data, rank: int = 0, world_size: int = 1):
        import orjson

        self.index  # noqa: B018  (build before timing documents)
        with get_datafolder(self.hits_folder).open(f"{rank:05d}.jsonl", "wb") as f:
            self._hits_file = f
            self._orjson = orjson
            yield from super().run(data, rank, world_size)
        self._hits_file = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        hits = self.index.find(doc.text)
        if not hits:
            return True
        cfg = self.config
        new_text = None
        if cfg.mode == "split":
            new_text = janitor_split(doc.text, hits, cfg.window, cfg.min_piece_chars, cfg.max_splits)
        action = "dropped" if new_text is None else "split"
        seen = set()
        src = doc_source(doc)
        for h in hits:
            if (h.benchmark, h.item_id) in seen:
                continue
            seen.add((h.benchmark, h.item_id))
            self.stat_update(stat_label("contaminated_items", h.benchmark, src))
            row = {"benchmark": h.benchmark, "item_id": h.item_id, "doc_id": doc.id, "source": src,
                   "ngram": h.ngram, "action": action}
            self._hits_file.write(self._orjson.dumps(row, option=self._orjson.OPT_APPEND_NEWLINE))
        for bench in sorted({h.benchmark for h in hits}):
            self.stat_update(stat_label("contaminated_docs", bench, src))
        if new_text is None:
            return self.drop(doc, "contaminated")
        self.stat_update(stat_label("decontam_split_docs", src))
        doc.text = new_text
        return True
