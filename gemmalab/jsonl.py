"""Reading JSONL input files line by line, with errors that name the file and line at fault."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from gemmalab.errors import GemmalabError


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file (.gz too); a bad line is an error naming
    the file and line, as is an object missing one of `required`."""
    path = Path(path)
    if not path.is_file():
        raise GemmalabError(f"File {path} does not exist.")
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GemmalabError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}).") from None
                if not isinstance(obj, dict):
                    raise GemmalabError(f"{path}, line {n}: expected a JSON object, got {type(obj).__name__}.")
                missing = [k for k in required if k not in obj]
                if missing:
                    raise GemmalabError(f"{path}, line {n}: missing field(s) {', '.join(missing)}.")
                yield n, obj
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise GemmalabError(f"File {path} cannot be read: {e}.") from None
