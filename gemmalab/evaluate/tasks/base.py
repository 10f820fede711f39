"""What a task is: samples to score or to continue, and how to score them. Readers for local task files that
name the file and line of any bad input."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmalab.errors import GemmalabError


@dataclass
class Sample:
    """One evaluated item.

    Choice tasks score `choices` as continuations of `prompt` (or, for partial scoring as in WinoGrande, one
    shared continuation `choices[0]` after each of `contexts`); `gold` is the index of the right one.
    Generation tasks continue `prompt`; `gold` is the reference answer and `data` holds what the scorer needs
    (tests, entry point, ...).
    """

    id: str
    prompt: str
    choices: list[str] = field(default_factory=list)
    contexts: list[str] | None = None
    gold: Any = None
    data: dict = field(default_factory=dict)


@dataclass
class Task:
    """A named list of samples and how to score them.

    kind "choice": log-likelihood of each choice; metrics acc and acc_norm (log-likelihood per character).
    kind "generate": greedy (or sampled, `num_samples` > 1) text until a stop string; then either `score`
    gives per-completion metrics (averaged), or `check_program` builds a Python program per completion that
    the sandbox runs (needs --allow-code-execution), giving pass@k.
    """

    name: str
    kind: str  # "choice" | "generate"
    samples: list[Sample]
    metric: str  # the headline metric in result.json
    target_delimiter: str = ""  # choice tasks: put between the context and each choice (lm-eval's target_delimiter)
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 256
    num_samples: int = 1
    temperature: float = 0.0
    score: Callable[[Sample, str], dict[str, float]] | None = None
    check_program: Callable[[Sample, str], str] | None = None
    pass_k: tuple[int, ...] = (1,)
    groups: Callable[[Sample], list[str]] | None = None  # extra per-group figures (e.g. MMLU categories)
    info: dict = field(default_factory=dict)  # protocol notes written to result.json (shots, split, source)


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file (.gz too); a bad line is an error naming
    the file and line, as is an object missing one of `required`."""
    path = Path(path)
    if not path.is_file():
        raise GemmalabError(f"Task file {path} does not exist.")
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
        raise GemmalabError(f"Task file {path} cannot be read: {e}.") from None


def read_csv_rows(path: str | Path, columns: int) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) for each row of a header-less CSV file with exactly `columns` fields."""
    path = Path(path)
    if not path.is_file():
        raise GemmalabError(f"Task file {path} does not exist.")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                if len(row) != columns:
                    raise GemmalabError(f"{path}, line {reader.line_num}: expected {columns} fields, got {len(row)}.")
                yield reader.line_num, row
    except (UnicodeDecodeError, csv.Error) as e:
        raise GemmalabError(f"Task file {path} cannot be read: {e}.") from None


def field_error(path: str | Path, line: int, message: str) -> GemmalabError:
    """An error about one record: `file, line N: message`."""
    return GemmalabError(f"{path}, line {line}: {message}")


def find_jsonl(directory: str | Path, stem: str) -> Path | None:
    """`directory/stem.jsonl`, else `directory/stem.jsonl.gz`, else None."""
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        path = Path(directory) / name
        if path.is_file():
            return path
    return None
