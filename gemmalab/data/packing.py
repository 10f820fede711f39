"""Packing: tokenize Documents JSONL into uint32 token shards with a document index and meta.json.

Folder layout (the design.md "Token shards" contract)::

    tokens-00000.bin   uint32 little endian: each document as BOS, its ids, EOS, back to back
    index-00000.npy    int64 [num_docs, 3]: (start offset in this shard, length, source number)
    meta.json          tokenizer fingerprint, vocab size, seq_len, shards, docs/tokens per source,
                       malformed input lines, and (only when planted) `canaries`
    canaries.jsonl     only with canaries (gemmalab.data.canaries): one line per distinct canary

A document never spans two shards. The source number indexes ``meta["source_names"]``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gemmalab.errors import GemmalabError
from gemmalab.files import BLANK, UNREADABLE, atomic_write, jsonl_lines

__all__ = ["PackMeta", "ShardInfo", "ShardWriter", "pack", "read_meta", "document_files", "iter_documents",
           "FORMAT", "META_FILE"]

log = logging.getLogger(__name__)

FORMAT = "gemmalab-token-shards-v1"
META_FILE = "meta.json"
_MAX_EXAMPLES = 20  # malformed lines quoted in meta.json; the count is always complete


@dataclass
class ShardInfo:
    """One shard: its token and index files and what they hold."""

    tokens: str
    index: str
    num_docs: int
    num_tokens: int


@dataclass
class PackMeta:
    """The content of meta.json."""

    tokenizer_fingerprint: str
    vocab_size: int
    bos_id: int
    eos_id: int
    seq_len: int
    num_docs: int = 0
    num_tokens: int = 0
    source_names: list[str] = field(default_factory=list)  # source number -> name (index column 2)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {"docs", "tokens"}
    shards: list[ShardInfo] = field(default_factory=list)
    # lines read = docs + empty + malformed + blank, per input file and in total
    inputs: list[dict] = field(default_factory=list)
    lines: int = 0
    empty: int = 0
    blank: int = 0
    malformed: int = 0
    unreadable: int = 0  # files that could not be read to the end (truncated gzip, invalid UTF-8)
    malformed_examples: list[str] = field(default_factory=list)
    canaries: dict | None = None  # what gemmalab.data.canaries planted (source, repeats, copies, ...); None: nothing
    format: str = FORMAT
    dtype: str = "uint32"
    byte_order: str = "little"

    def to_json(self) -> str:
        raw = asdict(self)
        if raw["canaries"] is None:  # absent unless planted: a folder packed without canaries is as it always was
            del raw["canaries"]
        return json.dumps(raw, indent=2, ensure_ascii=False) + "\n"


def read_meta(folder: str | Path) -> PackMeta:
    """Read and check the meta.json of a token shard folder."""
    path = Path(folder) / META_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GemmalabError(f"{path} does not exist: {folder} is not a packed token shard folder "
                            "(run `gemmalab data prepare` or gemmalab.data.packing.pack)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GemmalabError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise GemmalabError(f"{path}: field 'format' must be {FORMAT!r}, got {raw.get('format') if isinstance(raw, dict) else raw!r}")
    try:
        raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
        return PackMeta(**raw)
    except (TypeError, KeyError) as e:
        raise GemmalabError(f"{path}: unexpected or missing field ({e})") from None


# ---- reading documents ------------------------------------------------------------------------


def document_files(documents: str | Path | Sequence[str | Path]) -> list[Path]:
    """The JSONL files named by `documents`: a file, a folder (its *.jsonl[.gz|.zst], sorted) or a list."""
    items = [documents] if isinstance(documents, (str, os.PathLike)) else list(documents)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")))
            if not found:
                raise GemmalabError(f"document folder {p} has no .jsonl, .jsonl.gz or .jsonl.zst files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise GemmalabError(f"document input {p} does not exist")
    if not files:
        raise GemmalabError("no document files given to pack")
    return files


def iter_documents(path: Path, source_field: str = "source") -> Iterator[tuple[int, str, dict | None, str | None]]:
    """(line number, status, doc, problem) for each line of one Documents JSONL file.

    status is "ok" (doc is {"id", "text", "source"}), "blank", "empty" (text is ""), or "malformed"
    (problem says why). A document without ``metadata[source_field]`` gets source "unknown".
    """
    for lineno, obj, problem in jsonl_lines(path, blank_lines=True):
        if problem == BLANK:
            yield lineno, "blank", None, None
            continue
        if problem is not None and problem.startswith(UNREADABLE):  # truncated gzip, bad bytes: stop, say where
            yield -1, "unreadable", None, problem
            return
        if problem is not None:
            yield lineno, "malformed", None, problem
            continue
        text = obj.get("text")
        if not isinstance(text, str):
            yield lineno, "malformed", None, "field 'text' is missing or not a string"
            continue
        meta = obj.get("metadata")
        source = meta.get(source_field) if isinstance(meta, dict) else None
        if source is None:
            source = obj.get(source_field, "unknown")
        if not isinstance(source, str) or not source:
            yield lineno, "malformed", None, f"field 'metadata.{source_field}' is not a non-empty string"
            continue
        status = "ok" if text else "empty"
        yield lineno, status, {"id": obj.get("id"), "text": text, "source": source}, None


# ---- writing shards ---------------------------------------------------------------------------


class ShardWriter:
    """Appends token documents to uint32 shards in a folder and writes meta.json on close.

    Files are written under temporary names and renamed on `close`, so a folder with a meta.json is
    always complete; shards left over from an earlier pack of the same folder are removed.
    """

    def __init__(self, out_dir: str | Path, meta: PackMeta, shard_tokens: int = 2**27) -> None:
        if shard_tokens < 1:
            raise GemmalabError(f"shard_tokens must be >= 1, got {shard_tokens}")
        if meta.vocab_size > 2**32:
            raise GemmalabError(f"vocab_size {meta.vocab_size} does not fit uint32 token shards")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / META_FILE).unlink(missing_ok=True)  # the folder is incomplete until close()
        self.meta = meta
        self.shard_tokens = shard_tokens
        self._source_num: dict[str, int] = {n: i for i, n in enumerate(meta.source_names)}
        self._fh = None
        self._rows: list[tuple[int, int, int]] = []
        self._pos = 0

    def _finish_shard(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        k = len(self.meta.shards)
        tokens, index = f"tokens-{k:05d}.bin", f"index-{k:05d}.npy"
        np.save(self.out / (index + ".tmp.npy"), np.asarray(self._rows, dtype=np.int64).reshape(-1, 3))
        self.meta.shards.append(ShardInfo(tokens, index, len(self._rows), self._pos))
        self._fh, self._rows, self._pos = None, [], 0

    def add(self, ids: Sequence[int] | np.ndarray, source: str) -> None:
        """Append one document's token ids (already with BOS/EOS) labelled with `source`."""
        arr = np.asarray(ids, dtype=np.uint32)
        n = int(arr.shape[0])
        if self._fh is not None and self._pos + n > self.shard_tokens:
            self._finish_shard()
        if self._fh is None:
            self._fh = open(self.out / f"tokens-{len(self.meta.shards):05d}.bin.tmp", "wb")
        self._fh.write(arr.astype("<u4", copy=False).tobytes())
        if source not in self._source_num:
            self._source_num[source] = len(self.meta.source_names)
            self.meta.source_names.append(source)
            self.meta.sources[source] = {"docs": 0, "tokens": 0}
        self._rows.append((self._pos, n, self._source_num[source]))
        self._pos += n
        self.meta.sources[source]["docs"] += 1
        self.meta.sources[source]["tokens"] += n
        self.meta.num_docs += 1
        self.meta.num_tokens += n

    def close(self) -> PackMeta:
        """Finish the last shard, rename files into place, drop stale shards and write meta.json."""
        self._finish_shard()
        keep = set()
        for s in self.meta.shards:
            (self.out / (s.tokens + ".tmp")).replace(self.out / s.tokens)
            (self.out / (s.index + ".tmp.npy")).replace(self.out / s.index)
            keep.update((s.tokens, s.index))
        for f in self.out.iterdir():
            if f.name.startswith(("tokens-", "index-")) and f.name not in keep:
                f.unlink()
        atomic_write(self.out / META_FILE, self.meta.to_json())
        return self.meta


def pack(documents: str | Path | Sequence[str | Path], tokenizer, out_dir: str | Path, *, seq_len: int = 8192,
         shard_tokens: int = 2**27, source_field: str = "source", progress: bool = True, canaries=None) -> PackMeta:
    """Tokenize Documents JSONL into a token shard folder `out_dir`; returns what meta.json holds.

    Each document becomes BOS + ids + EOS (control-token text in documents stays plain text).
    Malformed lines are skipped, counted per file and quoted (the first 20) in meta.json, and
    logged; lines read = docs + empty + blank + malformed. `seq_len` is recorded as the loader's
    default; documents are never cut here. Re-running into the same folder replaces its content.
    `canaries` (a `gemmalab.data.canaries.CanaryConfig` with `enabled`) plants canary documents after the
    documents, as their own source; they are not counted in `lines` or `inputs`.
    """
    from tqdm.auto import tqdm

    if seq_len < 1:
        raise GemmalabError(f"seq_len must be >= 1, got {seq_len}")
    files = document_files(documents)
    meta = PackMeta(tokenizer_fingerprint=tokenizer.fingerprint(), vocab_size=int(tokenizer.vocab_size),
                    bos_id=int(tokenizer.bos_id), eos_id=int(tokenizer.eos_id), seq_len=int(seq_len))
    writer = ShardWriter(out_dir, meta, shard_tokens)
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="pack",
               disable=not progress or None)  # None: hidden when not on a terminal
    for path in files:
        counts = {"path": str(path), "lines": 0, "docs": 0, "empty": 0, "blank": 0, "malformed": 0,
                  "unreadable": 0}
        for lineno, status, doc, problem in iter_documents(path, source_field):
            if status == "unreadable":
                counts["unreadable"] = 1
                _note_malformed(meta, f"{path}: {problem}")
                continue
            counts["lines"] += 1
            if status != "ok":
                counts[status] += 1
                if status == "malformed":
                    _note_malformed(meta, f"{path}:{lineno}: {problem}")
                continue
            ids = tokenizer.encode(doc["text"], bos=True, parse_special=False)
            ids.append(meta.eos_id)
            writer.add(ids, doc["source"])
            counts["docs"] += 1
        bar.update(path.stat().st_size)
        meta.inputs.append(counts)
        for k in ("lines", "empty", "blank", "malformed", "unreadable"):
            setattr(meta, k, getattr(meta, k) + counts[k])
    bar.close()
    (Path(out_dir) / "canaries.jsonl").unlink(missing_ok=True)  # from an earlier pack of this folder
    if canaries is not None and canaries.enabled:
        from gemmalab.data.canaries import plant

        meta.canaries = plant(writer, tokenizer, canaries, out_dir)
    if meta.malformed or meta.unreadable:
        log.warning("pack: skipped %d malformed line(s); %d file(s) could not be read to the end; "
                    "see 'malformed_examples' in %s", meta.malformed, meta.unreadable, Path(out_dir) / META_FILE)
    return writer.close()


def _note_malformed(meta: PackMeta, message: str) -> None:
    log.debug("pack: %s", message)
    if len(meta.malformed_examples) < _MAX_EXAMPLES:
        meta.malformed_examples.append(message)
