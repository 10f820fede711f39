"""Reading and writing files: text and bytes (plain, .gz or .zst) line by line, JSONL with errors that name the file and line
at fault, and atomic writes (a reader never sees half a file, a crash never leaves one)."""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from gemmalab.errors import GemmalabError

__all__ = ["BLANK", "UNREADABLE", "open_text", "open_bytes", "jsonl_lines", "read_jsonl", "atomic_open", "atomic_dir", "atomic_write",
           "write_json"]


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


BLANK = "blank line"
UNREADABLE = "file cannot be read to the end"


def open_bytes(path: str | Path) -> IO[bytes]:
    """A binary, line-iterable stream over a file, gzip- or zstd-decompressed by its suffix."""
    path = Path(path)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise GemmalabError(f"{path} is zstd-compressed: install the `zstandard` package to read it") from None
        # zstandard's reader cannot iterate lines by itself: buffer it.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def jsonl_lines(path: str | Path, blank_lines: bool = False) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, object, problem) for each line of a JSONL file (.gz and .zst too), for readers that count and skip
    bad lines (`read_jsonl` stops at the first). A good line gives (n, object, None); a bad one (n, None, what is
    wrong): `not valid JSON (...)`, `not valid UTF-8`, `expected a JSON object, got list`, `not valid JSON here
    (...)` (an integer of more than 4,300 digits, nesting too deep for the parser); a blank line
    (n, None, BLANK) when `blank_lines`, else nothing. A file that cannot be read to its end (a truncated gzip)
    gives a last (n, None, "file cannot be read to the end (...)"), n being the line it stopped at; a missing
    file is an error."""
    path = Path(path)
    if not path.is_file():
        raise GemmalabError(f"File {path} does not exist.")
    n = 0
    try:
        with open_bytes(path) as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    if blank_lines:
                        yield n, None, BLANK
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield n, None, "not valid UTF-8"
                    continue
                except json.JSONDecodeError as e:
                    yield n, None, f"not valid JSON ({e.msg} at column {e.colno})"
                    continue
                except ValueError as e:  # an integer longer than Python's int-to-str limit (4,300 digits)
                    yield n, None, f"not valid JSON here ({e})"
                    continue
                except RecursionError:
                    yield n, None, "not valid JSON here (nested too deeply)"
                    continue
                if not isinstance(obj, dict):
                    yield n, None, f"expected a JSON object, got {type(obj).__name__}"
                    continue
                yield n, obj, None
    except (OSError, EOFError, ValueError) as e:  # gzip and zstd errors are OSError or ValueError
        yield n + 1, None, f"{UNREADABLE} ({type(e).__name__}: {e})"


def read_jsonl(path: str | Path, required: tuple[str, ...] = (),
               location: str = "{path}, line {line}") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file (.gz and .zst too); a bad line is an error naming
    the file and line (as `location` writes them), as is an object missing one of `required`."""
    for n, obj, problem in jsonl_lines(path):
        where = location.format(path=Path(path), line=n)
        if problem is not None:
            raise GemmalabError(f"{where}: {problem}.")
        missing = [k for k in required if k not in obj]
        if missing:
            raise GemmalabError(f"{where}: missing field(s) {', '.join(missing)}.")
        yield n, obj


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write `path` through `path.tmp`, renamed over it once the block ends without an error (fsynced first), so
    `path` is either the old file or the whole new one. Text modes write UTF-8."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Write the folder `path` as a whole: the block fills a temporary sibling folder (yielded), which then replaces
    `path`. The old folder is renamed aside first and deleted last, so a failure in the block leaves it untouched and
    `path` is never a mix of old and new files (a crash between the two renames leaves both siblings, hidden)."""
    path = Path(path)
    tmp, old = (path.with_name(f".{path.name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
    if path.parent.is_dir():  # what a killed earlier write left (any pid: containers reuse them)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
            if stale.name.rsplit("-", 1)[0] in (f".{path.name}.tmp", f".{path.name}.old"):
                stale.unlink() if stale.is_symlink() else shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        moved = False
        if path.exists() or path.is_symlink():
            path.rename(old)  # a symlink is renamed itself: the folder it points to is left as it is
            moved = True
        try:
            tmp.rename(path)
        except BaseException:
            if moved:
                old.rename(path)  # put the old folder back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to `path` atomically (see `atomic_open`); returns the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """`obj` as JSON (UTF-8, a final newline), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


_MODEL_FILES = ("*.safetensors", "*.gguf", "*.ckpt", "*.bin", "*.pt", "*.json", "tokenizer.model")


def stamp(path: str | Path) -> str | None:
    """A short digest of the names, sizes and modification times of a file, or of a model folder's own files (its
    weights, JSON and tokenizer at the top level: not an --out folder or logs inside it); None if nothing is there.
    Cheap, and it changes when weights are rewritten, so a resumed run can tell another model."""
    import hashlib

    p = Path(path)
    if p.is_dir():
        files = sorted({f for pattern in _MODEL_FILES for f in p.glob(pattern) if f.is_file()})
    else:
        files = [p] if p.is_file() else []
    if not files:
        return None
    listing = json.dumps([[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    return hashlib.sha256(listing.encode()).hexdigest()[:16]
