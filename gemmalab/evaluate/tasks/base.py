"""What a task is: samples to score or to continue, and how to score them. Readers for local task files that
name the file and line of any bad input."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmalab.errors import GemmalabError
from gemmalab.files import read_jsonl  # noqa: F401  (the tasks read their files through it)


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


def read_csv_rows(path: str | Path, columns: int) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) for each row of a header-less CSV file with exactly `columns` fields."""
    path = Path(path)
    if not path.is_file():
        raise GemmalabError(f"File {path} does not exist.")
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
