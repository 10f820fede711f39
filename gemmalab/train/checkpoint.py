"""Train-state checkpoints: torch.distributed.checkpoint (DCP) for model and optimizer, JSON for the rest.

Layout of one checkpoint, `OUT/checkpoints/step-0000100/`:
- `*.distcp`, `.metadata`: DCP of `{"model": ..., "optim": ...}` from `get_state_dict` (sharded under FSDP2,
  each rank writes its own shards; plain tensors in one process).
- `train_state.json`: step, loader state, scheduler state, elapsed seconds and whatever the trainer adds.
- `rng-NNNNN.json`: the python, numpy, torch (and CUDA) RNG states of rank NNNNN.
- `COMPLETE`: written last; lists every file with its size.

Atomicity: everything is written into `step-NNNNNNN.tmp/`, renamed to `step-NNNNNNN/`, then `COMPLETE` is
written. A directory without `COMPLETE`, with a file missing or of another size than `COMPLETE` says, or
with a `.tmp` name is never resumed from (a kill mid-write leaves exactly such a directory). A write that fails
(a full disk) removes its partial copy and raises a GemmalabError naming the previous checkpoint, left intact.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from gemmalab.errors import GemmalabError
from gemmalab.files import write_json

__all__ = ["save_checkpoint", "load_checkpoint", "latest_complete", "complete_checkpoints", "rng_state",
           "set_rng_state", "MARKER", "PHASES"]

MARKER = "COMPLETE"
# What is on disk after each phase of a write: an empty step-N.tmp/, + the DCP files, + rng-*.json, +
# train_state.json, renamed to step-N/ (no marker yet), + COMPLETE (older checkpoints not yet pruned).
PHASES = ("tmp", "model", "rng", "state", "renamed", "marked")
_NAME = re.compile(r"^step-(\d{7,})$")

log = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- RNG --------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states as JSON-able lists (python, numpy, torch CPU, every CUDA device)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---- finding checkpoints ------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    """COMPLETE exists and every file it lists is there with the recorded size."""
    marker = path / MARKER
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        return all((path / name).stat().st_size == size for name, size in files.items())
    except OSError:
        return False


def complete_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `directory`, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and _is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_complete(directory: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None. Incomplete and `.tmp` directories are ignored."""
    found = complete_checkpoints(directory)
    return found[-1][1] if found else None


# ---- save / load ------------------------------------------------------------------------------


def save_checkpoint(directory: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict, keep: int = 2, after: Callable[[str], None] | None = None) -> Path:
    """Write checkpoint `step` atomically under `directory` on all ranks; keep the newest `keep`. Returns its path.

    `train_state` (JSON-able: step, loader, scheduler, ...) is written by rank 0; every rank writes its RNG.
    `after(phase)` is called as each of PHASES is done (tests hang there: gemmalab.train.debug). A write that fails
    with an OSError (disk full, quota, read-only) removes what it wrote and raises a GemmalabError that names the
    previous complete checkpoint, which it leaves intact.
    """
    root = Path(directory)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    rank = _rank()
    done = after or (lambda phase: None)
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a run killed while writing this same step
                shutil.rmtree(tmp)
            if final.exists():  # an incomplete (or superseded) copy of the same step
                shutil.rmtree(final)
            tmp.mkdir()
        _barrier()
        done("tmp")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # one process without a group: DCP says so on every call
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        done("model")
        write_json(tmp / f"rng-{rank:05d}.json", rng_state(), indent=None)
        done("rng")
        if rank == 0:
            write_json(tmp / "train_state.json", train_state, indent=None)
        done("state")
        _barrier()
        if rank == 0:
            for f in tmp.iterdir():  # DCP writes without fsync on some versions; make the data durable first
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            tmp.rename(final)
            done("renamed")
            files = {f.name: f.stat().st_size for f in sorted(final.iterdir())}
            write_json(final / MARKER, {"step": step, "files": files}, indent=None)
            _fsync_dir(final)
            _fsync_dir(root)
            done("marked")
    except BaseException as e:  # CheckpointException (DCP's) is a BaseException
        if rank == 0:  # a partial copy is never resumed from, and on a full disk its space is wanted back
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / MARKER).is_file():
                shutil.rmtree(final, ignore_errors=True)
        cause = _os_error(e)
        if cause is None:
            raise
        found = complete_checkpoints(root)
        then = (f"The previous checkpoint, step {found[-1][0]} ({found[-1][1]}), is intact: free some space and "
                f"continue from it with --resume." if found else
                "There is no earlier complete checkpoint: free some space and start again.")
        raise GemmalabError(f"Checkpoint step {step} could not be written to {root}: {cause.strerror or cause}; "
                            f"its partial copy was removed. {then}") from e
    if rank == 0:  # the new checkpoint is complete: failing to delete an old one must not say otherwise
        try:
            _prune(root, keep)
        except OSError as e:
            log.warning("checkpoint %s is complete, but older ones could not be pruned: %s", final, e)
    _barrier()
    return final


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind a failed write: `error` itself, or one DCP wraps (its CheckpointException holds each
    rank's exception; torch.save reports a full disk as a RuntimeError whose context is the OSError)."""
    candidates = [error]
    if isinstance(error, CheckpointException):
        candidates += [exc for exc, _ in error.failures.values()]
    for e in candidates:
        while e is not None:
            if isinstance(e, OSError):
                return e
            e = e.__cause__ or e.__context__
    return None


def _prune(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints, and incomplete ones older than the newest."""
    complete = complete_checkpoints(root)
    for _, path in complete[:-keep] if keep > 0 else complete:
        shutil.rmtree(path, ignore_errors=True)
    newest = complete[-1][0] if complete else -1
    done = {p for _, p in complete}
    for p in root.iterdir():
        m = re.match(r"^step-(\d{7,})(\.tmp)?$", p.name)
        if m and p.is_dir() and p not in done and int(m.group(1)) <= newest:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load model and optimizer in place from checkpoint `path`, restore this rank's RNG; return train_state."""
    path = Path(path)
    if not _is_complete(path):
        raise GemmalabError(f"Checkpoint {path} is incomplete (no {MARKER} marker or a file is missing); "
                            f"it cannot be resumed from.")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank = _rank()
    rng_file = path / f"rng-{rank:05d}.json"
    if not rng_file.is_file():  # resumed on more ranks than saved: rank 0's state is the best guess
        rng_file = path / "rng-00000.json"
    set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    return json.loads((path / "train_state.json").read_text(encoding="utf-8"))
