"""Reading text and JSONL input files (plain, .gz or .zst) line by line, with errors that name the file and line at
fault."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from gemmalab.errors import GemmalabError


def open_text(path: str | Path) -> io.TextIOBase:
    """A UTF-8 text file, gzip- or zstd-decompressed by its suffix; lines end at "\\n" only."""
    path = Path(path)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise GemmalabError(f"{path} is zstd-compressed: install the `zstandard` package to read it") from None
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True),
                                encoding="utf-8", newline="\n")
    return open(path, encoding="utf-8", newline="\n")


def read_jsonl(path: str | Path, required: tuple[str, ...] = (),
               location: str = "{path}, line {line}") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file (.gz and .zst too); a bad line is an error naming
    the file and line (as `location` writes them), as is an object missing one of `required`."""
    path = Path(path)
    if not path.is_file():
        raise GemmalabError(f"File {path} does not exist.")
    try:
        with open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = location.format(path=path, line=n)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GemmalabError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from None
                if not isinstance(obj, dict):
                    raise GemmalabError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
                missing = [k for k in required if k not in obj]
                if missing:
                    raise GemmalabError(f"{where}: missing field(s) {', '.join(missing)}.")
                yield n, obj
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise GemmalabError(f"File {path} cannot be read: {e}.") from None
