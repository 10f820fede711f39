"""Benchmark decontamination: word 13-gram overlap, as the GPT-3 "janitor" defines it.

Text is lowercased, ASCII punctuation is deleted and the rest split on whitespace; a training
document is contaminated by a benchmark item when they share a word 13-gram. Two behaviours:

- `drop`: drop every document with a hit (the default, and the simple one to audit);
- `split`: the janitor's behaviour: cut each matched 13-gram plus `window` characters on both sides
  out of the document, keep the pieces of at least `min_piece_chars` characters (joined with a blank
  line, so one input document stays one output document), drop the document when it had more than
  `max_splits` hits or when nothing is left.

Benchmarks load from MMLU CSV/JSONL, MBPP, HumanEval, GSM8K JSONL or any JSONL with chosen fields;
`.gz` files are read transparently.
"""

from __future__ import annotations

import csv
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from gemmalab.errors import GemmalabError
from gemmalab.files import open_text, read_jsonl

FORMATS = ("mmlu", "mbpp", "humaneval", "gsm8k", "jsonl")
# The text fields each known format contributes (n-grams never span two fields).
_FORMAT_FIELDS = {
    "mbpp": ["text", "code", "test_list"],
    "humaneval": ["prompt", "canonical_solution"],
    "gsm8k": ["question", "answer"],
    "mmlu": ["question", "choices"],
}
_FORMAT_ID = {"mbpp": "task_id", "humaneval": "task_id"}
_PUNCT = str.maketrans("", "", string.punctuation)
_TOKEN = re.compile(r"\S+")


@dataclass
class BenchmarkSpec:
    """One benchmark file: `name` in reports, `format` one of FORMATS, `fields`/`id_field` for jsonl."""

    name: str
    path: str  # a file, or "package:MODULE:RELATIVE/PATH" for a file shipped inside an installed package
    format: str = "jsonl"
    fields: list[str] = field(default_factory=list)
    id_field: str | None = None
    optional: bool = False  # a missing file is skipped (and reported) instead of an error


@dataclass
class DecontamConfig:
    """Decontamination settings; `benchmarks` empty disables the step."""

    enabled: bool = True
    ngram: int = 13
    mode: str = "drop"  # "drop" | "split"
    window: int = 200
    min_piece_chars: int = 200
    max_splits: int = 10
    benchmarks: list[BenchmarkSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("drop", "split"):
            raise GemmalabError(f"`mode` = {self.mode!r}; choose 'drop' or 'split'")
        if self.ngram < 2:
            raise GemmalabError(f"`ngram` must be >= 2, got {self.ngram}")


@dataclass(frozen=True)
class BenchmarkItem:
    benchmark: str
    item_id: str
    texts: tuple[str, ...]


def normalize_words(text: str) -> list[str]:
    """The janitor's normalisation: lowercase, delete ASCII punctuation, split on whitespace."""
    return text.lower().translate(_PUNCT).split()


def _word_spans(text: str) -> list[tuple[str, int, int]]:
    """Normalised words with their character span in `text` (words that normalise to '' vanish)."""
    out = []
    for m in _TOKEN.finditer(text):
        w = m.group().lower().translate(_PUNCT)
        if w:
            out.append((w, m.start(), m.end()))
    return out


def _as_text(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise GemmalabError(f"{where}: expected a string or a list of strings, got {type(value).__name__}")


def resolve_benchmark_path(path: str) -> Path:
    """A benchmark path; `package:MODULE:REL` points inside an installed package (missing if it is not)."""
    if not path.startswith("package:"):
        return Path(path)
    try:
        _, module, rel = path.split(":", 2)
    except ValueError:
        raise GemmalabError(f"benchmark path {path!r}: expected 'package:MODULE:RELATIVE/PATH'") from None
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return Path(f"<package {module} not installed>") / rel
    return Path(list(spec.submodule_search_locations)[0]) / rel


def load_benchmark(spec: BenchmarkSpec) -> list[BenchmarkItem]:
    """Read one benchmark file into items; errors name the file, line and field at fault."""
    if spec.format not in FORMATS:
        raise GemmalabError(f"benchmark {spec.name!r}: unknown format {spec.format!r}; choose one of {FORMATS}")
    path = resolve_benchmark_path(spec.path)
    if not path.is_file():
        raise GemmalabError(f"benchmark {spec.name!r}: file not found: {path}")
    if spec.format == "mmlu" and path.name.removesuffix(".gz").endswith(".csv"):
        return _load_mmlu_csv(spec, path)
    fields = spec.fields or _FORMAT_FIELDS.get(spec.format, [])
    if not fields:
        raise GemmalabError(f"benchmark {spec.name!r}: format 'jsonl' needs `fields = [...]` naming the text fields")
    id_field = spec.id_field or _FORMAT_ID.get(spec.format)
    items = []
    for lineno, row in read_jsonl(path, location="{path}:{line}"):
        where = f"{path}:{lineno}"
        texts = []
        for name in fields:
            if name not in row:
                raise GemmalabError(f"{where}: missing field {name!r} (format {spec.format})")
            texts.append(_as_text(row[name], f"{where} field {name!r}"))
        item_id = str(row[id_field]) if id_field and id_field in row else str(lineno)
        items.append(BenchmarkItem(spec.name, item_id, tuple(texts)))
    return items


def _load_mmlu_csv(spec: BenchmarkSpec, path: Path) -> list[BenchmarkItem]:
    """MMLU's original CSV: question, A, B, C, D, answer (no header)."""
    items = []
    with open_text(path) as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) != 6:
                raise GemmalabError(f"{path}:{lineno}: MMLU CSV rows need 6 columns (question,A,B,C,D,answer)")
            items.append(BenchmarkItem(spec.name, f"{path.stem}:{lineno}", (row[0], "\n".join(row[1:5]))))
    return items


@dataclass
class Hit:
    """One benchmark item found in one document."""

    benchmark: str
    item_id: str
    ngram: str
    start: int  # character span of the first matching n-gram in the document
    end: int


class NgramIndex:
    """Word n-grams of every benchmark item -> the items that contain them."""

    def __init__(self, specs: list[BenchmarkSpec], n: int = 13):
        if n < 2:
            raise GemmalabError(f"decontamination.ngram must be >= 2, got {n}")
        self.n = n
        self.table: dict[str, list[tuple[str, str]]] = {}
        self.prefixes: set[tuple[str, str]] = set()  # first two words of every n-gram: a cheap pre-check
        self.items: dict[str, int] = {}  # benchmark -> items loaded
        self.indexed: dict[str, int] = {}  # benchmark -> items long enough to have an n-gram
        self.missing: list[str] = []  # optional benchmarks whose file was absent
        for spec in specs:
            if spec.optional and not resolve_benchmark_path(spec.path).is_file():
                self.missing.append(spec.name)
                continue
            items = load_benchmark(spec)
            self.items[spec.name] = self.items.get(spec.name, 0) + len(items)
            for item in items:
                has_ngram = False
                for text in item.texts:
                    words = normalize_words(text)
                    for i in range(len(words) - n + 1):
                        key = " ".join(words[i : i + n])
                        self.prefixes.add((words[i], words[i + 1]))
                        refs = self.table.setdefault(key, [])
                        if (item.benchmark, item.item_id) not in refs:
                            refs.append((item.benchmark, item.item_id))
                        has_ngram = True
                self.indexed[spec.name] = self.indexed.get(spec.name, 0) + int(has_ngram)

    def find(self, text: str) -> list[Hit]:
        """Every (benchmark item, matching n-gram span) in `text`; one Hit per item and n-gram position."""
        if not self.table:
            return []
        words = _word_spans(text)
        n = self.n
        hits = []
        prefixes = self.prefixes
        for i in range(len(words) - n + 1):
            if (words[i][0], words[i + 1][0]) not in prefixes:
                continue
            key = " ".join(w for w, _, _ in words[i : i + n])
            refs = self.table.get(key)
            if refs:
                for bench, item_id in refs:
                    hits.append(Hit(bench, item_id, key, words[i][1], words[i + n - 1][2]))
        return hits


def janitor_split(text: str, hits: list[Hit], window: int, min_piece_chars: int, max_splits: int) -> str | None:
    """Cut each hit plus `window` characters around it; None when too dirty or nothing is left."""
    spans = sorted({(max(0, h.start - window), min(len(text), h.end + window)) for h in hits})
    merged: list[list[int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    if len(merged) > max_splits:
        return None
    pieces, pos = [], 0
    for s, e in merged:
        pieces.append(text[pos:s])
        pos = e
    pieces.append(text[pos:])
    kept = [p.strip() for p in pieces if len(p.strip()) >= min_piece_chars]
    return "\n\n".join(kept) if kept else None


def contamination_report(index: NgramIndex, hits: list[dict]) -> dict:
    """Per-benchmark report from the hit records the decontamination step wrote.

    `hits` rows: {"benchmark", "item_id", "doc_id", "source", "ngram", "action"}.
    """
    report: dict = {"ngram": index.n, "missing_benchmarks": index.missing, "benchmarks": {}}
    for name in index.items:
        rows = [h for h in hits if h["benchmark"] == name]
        items: dict[str, dict] = {}
        for h in rows:
            entry = items.setdefault(h["item_id"], {"item_id": h["item_id"], "documents": [], "example_ngram": h["ngram"]})
            if h["doc_id"] not in entry["documents"]:
                entry["documents"].append(h["doc_id"])
        report["benchmarks"][name] = {
            "items": index.items[name],
            "items_with_ngrams": index.indexed.get(name, 0),
            "items_found": len(items),
            "documents_hit": len({h["doc_id"] for h in rows}),
            "contaminated_items": sorted(items.values(), key=lambda e: e["item_id"]),
        }
    return report
