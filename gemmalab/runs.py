"""The run directory every stage writes (design.md), and the files in it that more than one stage needs.

    OUT/config.toml      the resolved config (`gemmalab.config.dump`): `--config OUT/config.toml` repeats the run
    OUT/metrics.jsonl    one JSON object per logged step (`MetricsLogger`), OUT/tensorboard/ the same numbers
    OUT/*.jsonl          per-record files a resumed run continues (`RecordLog`: eval samples, judgements, ...)
    OUT/checkpoints/     train state (gemmalab.train.checkpoint)      OUT/model/   the model directory it produced
    OUT/result.json      written last and atomically: {"stage", "status", <the stage's headline figures>}

The report and later stages read only these files. `status` is "finished", "interrupted" (stopped by a signal;
resumable) or "submitted" (work handed to a cluster scheduler).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from gemmalab.errors import GemmalabError
from gemmalab.files import atomic_write, jsonl_lines, write_json

__all__ = ["RunDir", "RecordLog", "MetricsLogger", "read_result", "keep_settings"]

log = logging.getLogger(__name__)


class RunDir:
    """One stage's run directory. Creating the object touches nothing; `create()` makes the folder."""

    def __init__(self, path: str | Path, stage: str) -> None:
        self.path = Path(path)
        self.stage = stage

    @property
    def config_file(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def snapshot(self, cfg: Any) -> Path:
        """Write the resolved config to OUT/config.toml."""
        from gemmalab.config import dump

        self.create()
        return dump(cfg, self.config_file, f"Resolved {self.stage} config (gemmalab); "
                                           f"`gemmalab {self.stage} --config THIS_FILE` repeats the run.")

    def metrics(self, tensorboard: bool = True) -> MetricsLogger:
        """The metrics logger of this run (appends); without the tensorboard package, metrics.jsonl alone."""
        try:
            return MetricsLogger(self.path, tensorboard=tensorboard)
        except GemmalabError as e:
            log.warning("%s Logging to metrics.jsonl only.", e)
            return MetricsLogger(self.path, tensorboard=False)

    def trim_metrics(self, last_step: int) -> None:
        """Drop metrics.jsonl lines of steps after `last_step` (a killed run logged steps its checkpoint lacks;
        0 empties the file for a fresh run), and a line cut by the kill."""
        if not self.metrics_file.is_file():
            return
        kept = [json.dumps(obj) for _, obj, _ in jsonl_lines(self.metrics_file)
                if obj is not None and isinstance(obj.get("step"), int) and obj["step"] <= last_step]
        atomic_write(self.metrics_file, "".join(line + "\n" for line in kept))

    def records(self, name: str, key: str = "id") -> RecordLog:
        """The resumable record file OUT/NAME.jsonl (NAME may hold a subfolder: `samples/mmlu`)."""
        return RecordLog(self.path / f"{name}.jsonl", key)

    def write_result(self, status: str, figures: Mapping[str, Any]) -> dict:
        """Write OUT/result.json, {"stage", "status", **figures}, atomically (the last file a stage writes)."""
        result = {"stage": self.stage, "status": status, **figures}
        self.create()
        write_json(self.result_file, result)
        return result

    def result(self) -> dict | None:
        """What result.json holds, or None when the stage has not finished."""
        return read_result(self.path)


def read_result(run_dir: str | Path) -> dict | None:
    """The result.json of a run directory, or None if there is none; an unreadable one is an error naming it."""
    path = Path(run_dir) / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise GemmalabError(f"{path} cannot be read: {e}.") from None
    if not isinstance(result, dict):
        raise GemmalabError(f"{path} must hold a JSON object.")
    return result


def keep_settings(meta_path: str | Path, meta: dict, records: Iterable[str | Path], what: str,
                  remedy: str = "that folder to start again") -> None:
    """Refuse to continue records made with other settings: when `meta_path` and any of `records` exist, every key
    of `meta` must equal the stored one (else a GemmalabError: "WHAT with other settings (KEYS differ). Use another
    --out, or delete REMEDY."). Then `meta` is written to `meta_path`."""
    path = Path(meta_path)
    if path.is_file() and any(Path(r).is_file() for r in records):
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in meta if old.get(k) != meta[k]]
        if changed:
            raise GemmalabError(f"{what} with other settings ({', '.join(changed)} differ). Use another --out, or "
                                f"delete {remedy}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, meta)


class RecordLog:
    """Per-record JSONL that a resumed run continues. Every record has a unique `key` field; `done` maps key ->
    record for those written before. A last line cut off by a crash is dropped here, once (the file is rewritten
    without it, so appending starts on a fresh line): that record is simply made again."""

    def __init__(self, path: str | Path, key: str = "id") -> None:
        self.path = Path(path)
        self.key = key
        self.done: dict[Any, dict] = {}
        self._file = None
        if self.path.is_file():
            self._recover()

    def _recover(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        good = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a cut line: nothing after it was written
            if not isinstance(rec, dict) or self.key not in rec:
                raise GemmalabError(f"{self.path}, line {len(good) + 1}: expected a record with a {self.key!r} field.")
            self.done[rec[self.key]] = rec
            good.append(line)
        kept = "".join(line + "\n" for line in good)
        if kept != text:
            atomic_write(self.path, kept)

    def append(self, records: Iterable[dict]) -> None:
        """Write records (flushed at once) and add them to `done`."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        for rec in records:
            self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.done[rec[self.key]] = rec
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """JSON-safe scalar: tensors to Python numbers, non-finite floats to None (strict JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Writes one JSON object per step to `run_dir/metrics.jsonl` (appended, so resumed runs continue it) and
    the numeric values as TensorBoard scalars under `run_dir/tensorboard/`. Use as a context manager or close()."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise GemmalabError(
                    "TensorBoard logging needs the tensorboard package: pip install tensorboard "
                    "(or pass tensorboard=False)."
                ) from e
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` (name -> number, tensor or string) for step `step`."""
        if self._file is None:
            raise GemmalabError("MetricsLogger.log called after close().")
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()  # a crashed run keeps every logged step
        except OSError as e:  # disk full, quota: the run stops here, its checkpoints stay
            raise GemmalabError(f"{self.run_dir / 'metrics.jsonl'}: could not record step {step} "
                                f"({e.strerror or e}); free some space and continue with --resume.") from e
        if self._writer is not None:
            for name, value in row.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(name, value, int(step))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
