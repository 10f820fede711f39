"""Reading and writing Documents JSONL in datatrove pipelines, losing nothing silently.

datatrove's JsonlReader logs and skips malformed JSON, skips documents without text with one
warning, and stops reading a file at the first invalid UTF-8 byte. `CountingJsonlReader` reads
the same design-contract files (`{"id", "text", "metadata": {"source": ...}}`, plain, gzip or
zstd) and counts every line it cannot use, by reason and file, next to the documents it yields.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder, open_file
from datatrove.pipeline.base import PipelineStep

from gemmalab.data.filters import doc_source, stat_label

__all__ = ["InputFile", "open_lines", "CountingJsonlReader", "TaskFileReader", "OutputCounter", "document_adapter",
           "MALFORMED_REASONS"]

MALFORMED_REASONS = ("blank_line", "invalid_utf8", "invalid_json", "not_an_object", "missing_text",
                     "non_string_text", "bad_metadata", "unreadable_file")


@dataclass(frozen=True)
class InputFile:
    """One input file and the source name for its documents that carry none."""

    path: str
    source: str | None = None


@contextmanager
def open_lines(path: str) -> Iterator[IO[bytes]]:
    """A binary, line-iterable stream over `path` (any fsspec path), decompressing .gz and .zst."""
    with open_file(path, "rb") as raw:
        if path.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as f:
                yield f
        elif path.endswith((".zst", ".zstd")):
            import zstandard

            # zstandard's reader cannot iterate lines by itself: buffer it.
            with io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)) as f:
                yield f
        else:
            yield raw


class _TokenCounter:
    """Counts tokens with a gemmalab tokenizer (any `gemmalab.load_tokenizer` reference), loaded lazily."""

    def __init__(self, ref: str | None):
        self.ref = ref
        self._tok = None

    def __call__(self, text: str) -> int:
        if self._tok is None:
            from gemmalab.checkpoint import load_tokenizer

            self._tok = load_tokenizer(self.ref)
        return len(self._tok.encode(text, bos=False, parse_special=False))

    def __getstate__(self):  # ship the reference to workers, not the loaded model
        return {"ref": self.ref, "_tok": None}


def document_adapter(self, document: Document) -> dict:
    """Writer adapter: exactly the design contract's fields."""
    return {"id": document.id, "text": document.text, "metadata": document.metadata}


class CountingJsonlReader(PipelineStep):
    """Reads Documents JSONL files, task `rank` taking files rank, rank + world_size, ...

    Counts (datatrove stats): `gl|in|<source>` documents, `gl|in_bytes|<source>` UTF-8 bytes of
    text, `gl|in_words|<source>`; `gl|malformed|<reason>|<file>` unusable lines; documents whose
    text is empty or whitespace are read, counted in, and dropped as `gl|drop|reader|empty|<source>`.
    With `tokenizer` (a tokenizer.model file/folder or .gguf), also `gl|in_tokens|<source>`.
    """

    type = "📖 - READER"
    name = "📖 gemmalab counting JSONL reader"

    def __init__(self, files: list[InputFile], text_key: str = "text", id_key: str = "id",
                 tokenizer: str | None = None):
        super().__init__()
        self.files = list(files)
        self.text_key = text_key
        self.id_key = id_key
        self.count_tokens = _TokenCounter(tokenizer) if tokenizer else None

    def _malformed(self, reason: str, path: str, value: int = 1) -> None:
        self.stat_update(stat_label("malformed", reason, Path(path).name), value=value)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        for spec in self.files[rank::world_size]:
            yield from self._read_file(spec)

    def _read_file(self, spec: InputFile) -> DocumentsPipeline:
        stem = Path(spec.path).name
        lineno = 0
        try:
            with open_lines(spec.path) as f:
                for lineno, raw in enumerate(f, 1):
                    with self.track_time():
                        doc = self._parse(raw, spec, stem, lineno)
                    if doc is not None:
                        yield doc
        except (OSError, EOFError, ValueError) as e:  # truncated gzip/zstd, unreadable file
            # The lines read so far were counted; what is left of the file is one loss, reported.
            self._malformed("unreadable_file", spec.path)
            from datatrove.utils.logging import logger

            logger.warning(f"{spec.path}: stopped reading after line {lineno}: {e}")

    def _parse(self, raw: bytes, spec: InputFile, stem: str, lineno: int) -> Document | None:
        if not raw.strip():
            self._malformed("blank_line", spec.path)
            return None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._malformed("invalid_utf8", spec.path)
            return None
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            self._malformed("invalid_json", spec.path)
            return None
        if not isinstance(row, dict):
            self._malformed("not_an_object", spec.path)
            return None
        if self.text_key not in row or row[self.text_key] is None:
            self._malformed("missing_text", spec.path)
            return None
        text = row[self.text_key]
        if not isinstance(text, str):
            self._malformed("non_string_text", spec.path)
            return None
        metadata = row.get("metadata", {})
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            self._malformed("bad_metadata", spec.path)
            return None
        if not isinstance(metadata.get("source"), str) or not metadata.get("source"):
            metadata["source"] = spec.source or "unknown"
        doc_id = row.get(self.id_key)
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
            doc_id = f"{stem}:{lineno}"
        doc = Document(text=text, id=str(doc_id), metadata=metadata)
        src = metadata["source"]
        self.stat_update(stat_label("in", src))
        self.stat_update(stat_label("in_bytes", src), value=len(text.encode("utf-8")))
        self.stat_update(stat_label("in_words", src), value=len(text.split()))
        if self.count_tokens is not None:
            self.stat_update(stat_label("in_tokens", src), value=self.count_tokens(text))
        if not text.strip():
            self.stat_update(stat_label("drop", "reader", "empty", src))
            return None
        return doc


class TaskFileReader(PipelineStep):
    """Reads back what task `rank` of an earlier stage wrote to `folder/NNNNN.jsonl` (none: no docs).

    Later stages (dedup) address documents by their index within a task's file, so each task must
    read exactly its own file in order, which datatrove's sharding over a listing does not promise
    when some tasks wrote nothing.
    """

    type = "📖 - READER"
    name = "📖 gemmalab task file reader"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        df = get_datafolder(self.folder)
        name = f"{rank:05d}.jsonl"
        if not df.exists(name):
            return
        with df.open(name, "rb") as f:
            for raw in f:
                row = orjson.loads(raw)
                yield Document(text=row["text"], id=row["id"], metadata=row.get("metadata") or {})


class OutputCounter(PipelineStep):
    """Counts the documents that reach the output: `gl|out|<source>`, `gl|out_bytes|...`, `gl|out_words|...`
    and, with a tokenizer, `gl|out_tokens|...`."""

    type = "📊 - STATS"
    name = "📊 gemmalab output counter"

    def __init__(self, tokenizer: str | None = None):
        super().__init__()
        self.count_tokens = _TokenCounter(tokenizer) if tokenizer else None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            src = doc_source(doc)
            self.stat_update(stat_label("out", src))
            self.stat_update(stat_label("out_bytes", src), value=len(doc.text.encode("utf-8")))
            self.stat_update(stat_label("out_words", src), value=len(doc.text.split()))
            if self.count_tokens is not None:
                self.stat_update(stat_label("out_tokens", src), value=self.count_tokens(doc.text))
            yield doc
