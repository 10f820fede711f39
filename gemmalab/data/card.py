"""The data card: what went in, what came out and why the rest did not, per source.

Built from the datatrove stats every stage saved (`logs/<stage>/stats/NNNNN.json`): gemmalab's
steps record `gl|...` labels (see `gemmalab.data.filters.stat_label`), summed here over tasks.
The card checks that the counts reconcile: for every source, documents in = documents out + the
documents dropped for each reason. Lines that never became documents (malformed JSON, invalid
UTF-8, missing text, ...) are counted separately, by reason and file.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gemmalab.files import write_json

__all__ = ["DataCard", "collect_counts", "build_data_card"]


@dataclass
class DataCard:
    """One preparation run, as written to `data_card.json`."""

    documents_in: int
    documents_out: int
    documents_dropped: int
    reconciled: bool
    sources: dict[str, dict] = field(default_factory=dict)
    drops_by_filter: dict[str, dict[str, int]] = field(default_factory=dict)
    malformed_lines: dict[str, int] = field(default_factory=dict)
    malformed_by_file: dict[str, dict[str, int]] = field(default_factory=dict)
    pii_found: dict[str, int] = field(default_factory=dict)
    pii_redacted_documents: int = 0
    toxic_lines_removed: int = 0
    contamination: dict[str, dict] = field(default_factory=dict)
    executor: str = "local"
    tokens_note: str = ("tokens_in/tokens_out per source are counted when the config names a `tokenizer` "
                        "(null otherwise); packing's meta.json also counts tokens per source")
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: str | Path) -> None:
        write_json(path, self.to_dict())


def _total(value) -> int:
    if isinstance(value, dict):
        return int(value.get("total", 0))
    return int(value or 0)


def collect_counts(logs_root: str | Path) -> Counter:
    """Sum every `gl|...` stat over all stages and tasks under `logs_root`."""
    counts: Counter = Counter()
    for stats_file in sorted(Path(logs_root).glob("*/stats/*.json")):
        for step in json.loads(stats_file.read_text()):
            for label, value in step.get("stats", {}).items():
                if label.startswith("gl|"):
                    counts[label] += _total(value)
    return counts


def build_data_card(counts: Counter, contamination: dict | None = None, executor: str = "local",
                    config: dict | None = None) -> DataCard:
    """Assemble the card from summed stats (see `collect_counts`) and the contamination report."""
    sources: dict[str, dict] = defaultdict(lambda: {
        "documents_in": 0, "documents_out": 0, "bytes_in": 0, "bytes_out": 0, "words_in": 0, "words_out": 0,
        "tokens_in": None, "tokens_out": None,
        "dropped": {}, "pii_found": {}, "pii_redacted_documents": 0, "toxic_lines_removed": 0})
    drops: dict[str, dict[str, int]] = defaultdict(dict)
    malformed: Counter = Counter()
    malformed_by_file: dict[str, dict[str, int]] = defaultdict(dict)
    pii_found: Counter = Counter()
    simple = {"in": "documents_in", "out": "documents_out", "in_bytes": "bytes_in", "out_bytes": "bytes_out",
              "in_words": "words_in", "out_words": "words_out", "pii_redacted_docs": "pii_redacted_documents",
              "toxic_lines_removed": "toxic_lines_removed"}
    for label, n in sorted(counts.items()):
        parts = label.split("|")[1:]
        kind = parts[0]
        if kind in simple:
            sources["|".join(parts[1:])][simple[kind]] += n
        elif kind in ("in_tokens", "out_tokens"):
            key = "tokens_in" if kind == "in_tokens" else "tokens_out"
            src = sources["|".join(parts[1:])]
            src[key] = (src[key] or 0) + n
        elif kind == "drop":
            filt, reason, src = parts[1], parts[2], "|".join(parts[3:])
            key = f"{filt}/{reason}"
            sources[src]["dropped"][key] = sources[src]["dropped"].get(key, 0) + n
            drops[filt][reason] = drops[filt].get(reason, 0) + n
        elif kind == "malformed":
            reason, fname = parts[1], "|".join(parts[2:])
            malformed[reason] += n
            malformed_by_file[fname][reason] = malformed_by_file[fname].get(reason, 0) + n
        elif kind == "pii":
            kind_, src = parts[1], "|".join(parts[2:])
            pii_found[kind_] += n
            sources[src]["pii_found"][kind_] = sources[src]["pii_found"].get(kind_, 0) + n
    reconciled = True
    for s in sources.values():
        s["documents_dropped"] = sum(s["dropped"].values())
        s["reconciled"] = s["documents_in"] == s["documents_out"] + s["documents_dropped"]
        reconciled &= s["reconciled"]
    doc_in = sum(s["documents_in"] for s in sources.values())
    doc_out = sum(s["documents_out"] for s in sources.values())
    return DataCard(
        documents_in=doc_in,
        documents_out=doc_out,
        documents_dropped=sum(s["documents_dropped"] for s in sources.values()),
        reconciled=reconciled,
        sources={k: sources[k] for k in sorted(sources)},
        drops_by_filter={k: dict(sorted(v.items())) for k, v in sorted(drops.items())},
        malformed_lines=dict(sorted(malformed.items())),
        malformed_by_file={k: v for k, v in sorted(malformed_by_file.items())},
        pii_found=dict(sorted(pii_found.items())),
        pii_redacted_documents=sum(s["pii_redacted_documents"] for s in sources.values()),
        toxic_lines_removed=sum(s["toxic_lines_removed"] for s in sources.values()),
        contamination=contamination or {},
        executor=executor,
        config=config or {},
    )
