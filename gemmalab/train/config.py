"""TrainConfig: the pretraining run as typed dataclasses, loaded from TOML with `key=value` overrides.

A config file has the sections `[model]` (a preset plus ModelConfig field overrides), `[data]`,
`[optim]` (OptimConfig), `[train]`, `[checkpoint]` and `[carbon]` (CarbonConfig), and an optional
top-level `out_dir`. Unknown sections and keys are errors that name the file and the key, so a typo
never silently falls back to a default. `to_toml()` writes the resolved config (what the run used).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmalab.config import apply_overrides, convert, from_table, parse_overrides, read_toml
from gemmalab.data.mixture import Mixture
from gemmalab.errors import GemmalabError
from gemmalab.model.config import ModelConfig, get_preset
from gemmalab.train.metrics import CarbonConfig
from gemmalab.train.optim import OptimConfig

__all__ = ["ModelSection", "DataSection", "TrainSection", "CheckpointSection", "TrainConfig", "load_config",
           "parse_overrides", "to_toml"]

DTYPES = ("fp32", "bf16")


@dataclass
class ModelSection:
    """A named preset and the ModelConfig fields that differ from it (TOML: `[model] preset = ...; dim = ...`)."""

    preset: str = "tiny-gemma3"
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self) -> ModelConfig:
        """The resolved ModelConfig (validated by ModelConfig itself)."""
        return get_preset(self.preset).replace(**self.overrides)


@dataclass
class DataSection:
    """Token shards and batch shape. batch_size is per process and per micro-batch."""

    shards: list[str] = field(default_factory=lambda: ["runs/data/builtin/tokens"])
    tokenizer: str | None = None  # tokenizer.model copied into the exported model directory
    batch_size: int = 8
    seq_len: int = 256
    mixture: dict | None = None  # {"stages": [{"until": 0.9, "weights": {...}}, ...]}; None: natural shares
    seed: int = 0


@dataclass
class TrainSection:
    """The loop: length, numerics, memory/speed switches and failure handling."""

    steps: int = 300
    grad_accum: int = 1  # micro-batches per optimizer step
    dtype: str = "fp32"  # "fp32" | "bf16" (bf16 compute, fp32 master weights)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block
    z_loss: float = 0.0
    loss_chunk_mb: int = 256  # the loss builds fp32 logits of at most this size at a time (all rows if they fit)
    init_std: float = 0.02
    log_every: int = 1
    max_bad_steps: int = 5  # non-finite steps in a row before the run stops
    seed: int = 0  # weight init
    device: str = "auto"  # "auto": CUDA when available, else CPU (ignored under torchrun)
    threads: int = 0  # CPU threads (torch.set_num_threads); 0: torch's default
    keep_freed_memory: bool = True  # CPU: glibc malloc keeps freed memory (no per-step page faults; gemmalab.host_memory)
    debug_nan_steps: list[int] = field(default_factory=list)  # tests: NaN injected into these steps' activations
    debug_hang_at_step: int = 0  # tests: after this step, write OUT/hang-STEP and wait for a signal


@dataclass
class CheckpointSection:
    """Train-state checkpoints (DCP) under OUT/checkpoints/."""

    every: int = 100  # steps; 0: only at the end and on SIGTERM
    keep: int = 2  # newest complete checkpoints kept
    at_end: bool = True  # also when the run finishes (SIGTERM always writes one); off for benchmarks
    export: bool = True  # the trained model as a model directory, OUT/model


@dataclass
class TrainConfig:
    """Everything a pretraining run needs; `load_config` builds one from TOML."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    carbon: CarbonConfig = field(default_factory=CarbonConfig)
    out_dir: str = "runs/tiny/pretrain"

    def model_config(self) -> ModelConfig:
        return self.model.build()

    def mixture(self) -> Mixture | None:
        return Mixture.from_dict(self.data.mixture) if self.data.mixture is not None else None

    def to_dict(self) -> dict:
        """Plain nested dict in the TOML layout (model overrides flattened into [model])."""
        out: dict[str, Any] = {"out_dir": self.out_dir,
                               "model": {"preset": self.model.preset, **self.model.overrides}}
        for name in ("data", "optim", "train", "checkpoint", "carbon"):
            out[name] = dataclasses.asdict(getattr(self, name))
        return out


_SECTIONS: dict[str, type] = {"data": DataSection, "optim": OptimConfig, "train": TrainSection,
                              "checkpoint": CheckpointSection, "carbon": CarbonConfig}


# ---- loading ----------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML file (None: all defaults), apply `key=value` overrides (dotted keys), validate.

    Overrides are typed: the value is read as a TOML value (`train.steps=10`, `optim.lr=3e-4`,
    `data.shards=["a","b"]`), and anything that is not valid TOML is taken as a string (`train.dtype=bf16`).
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    if overrides:
        apply_overrides(data, overrides, "command line")
        source += " (with command-line overrides)"
    return from_dict(data, source)


def from_dict(data: dict, source: str = "config") -> TrainConfig:
    """Build and validate a TrainConfig from the parsed TOML layout."""
    known = {"out_dir", "model", *_SECTIONS}
    for key in data:
        if key not in known:
            raise GemmalabError(f"{source}: unknown key {key!r}; known top-level keys and sections: {', '.join(sorted(known))}.")
    kwargs: dict[str, Any] = {}
    if "out_dir" in data:
        kwargs["out_dir"] = convert(str, data["out_dir"], "out_dir", source, quote="")
    kwargs["model"] = _model_section(data.get("model", {}), source)
    kwargs["train"] = from_table(TrainSection, data.get("train", {}), source, "train", quote="")
    optim = data.get("optim", {})
    if isinstance(optim, dict) and "total_steps" not in optim:  # the schedule spans the run unless told otherwise
        optim = {**optim, "total_steps": kwargs["train"].steps}
    kwargs["optim"] = from_table(OptimConfig, optim, source, "optim", quote="")
    for name, cls in _SECTIONS.items():
        if name not in kwargs:
            kwargs[name] = from_table(cls, data.get(name, {}), source, name, quote="")
    cfg = TrainConfig(**kwargs)
    _validate(cfg, source)
    return cfg


def _model_section(table: Any, source: str) -> ModelSection:
    if not isinstance(table, dict):
        raise GemmalabError(f"{source}: [model] must be a table.")
    table = dict(table)
    preset = convert(str, table.pop("preset", ModelSection.preset), "model.preset", source, quote="")
    hints = typing.get_type_hints(ModelConfig)
    overrides = {}
    for key, value in table.items():
        if key not in hints:
            raise GemmalabError(f"{source}: unknown key 'model.{key}'; [model] takes 'preset' and the ModelConfig "
                                f"fields {', '.join(sorted(hints))}.")
        overrides[key] = convert(hints[key], value, f"model.{key}", source, quote="")
    section = ModelSection(preset, overrides)
    section.build()  # unknown preset or an invalid shape fails here, at load time
    return section


def _validate(cfg: TrainConfig, source: str) -> None:
    t, d, c = cfg.train, cfg.data, cfg.checkpoint
    problems = []
    for key, value in (("train.steps", t.steps), ("train.grad_accum", t.grad_accum), ("data.batch_size", d.batch_size),
                       ("data.seq_len", d.seq_len), ("train.loss_chunk_mb", t.loss_chunk_mb), ("train.log_every", t.log_every),
                       ("train.max_bad_steps", t.max_bad_steps), ("checkpoint.keep", c.keep)):
        if value < 1:
            problems.append(f"{key} must be >= 1, got {value}")
    if c.every < 0:
        problems.append(f"checkpoint.every must be >= 0, got {c.every}")
    if t.dtype not in DTYPES:
        problems.append(f"train.dtype must be one of {', '.join(DTYPES)}, got {t.dtype!r}")
    if not d.shards:
        problems.append("data.shards must name at least one token shard folder")
    if t.z_loss < 0 or not math.isfinite(t.z_loss):
        problems.append(f"train.z_loss must be >= 0, got {t.z_loss}")
    mc = cfg.model_config()
    if d.seq_len > mc.max_seq_len:
        problems.append(f"data.seq_len ({d.seq_len}) exceeds the model's max_seq_len ({mc.max_seq_len})")
    if problems:
        raise GemmalabError(f"{source}: " + "; ".join(problems) + ".")
    if d.mixture is not None:
        try:
            cfg.mixture()
        except GemmalabError as e:
            raise GemmalabError(f"{source}: data.mixture: {e}") from None


# ---- writing ----------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def to_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML (None values are written as comments: TOML has no null)."""
    data = cfg.to_dict()
    lines = ["# Resolved pretraining config (gemmalab). Re-run with: gemmalab pretrain --config THIS_FILE"]
    _write_items(lines, "", data)
    return "\n".join(lines) + "\n"


def _write_items(lines: list[str], prefix: str, table: dict) -> None:
    plain = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_array(v)}
    for k, v in plain.items():
        lines.append(f"# {_key(k)} = (unset)" if v is None else f"{_key(k)} = {_value(v)}")
    for k, v in table.items():
        path = f"{prefix}{_key(k)}"
        if isinstance(v, dict):
            lines += ["", f"[{path}]"]
            _write_items(lines, path + ".", v)
        elif _is_table_array(v):
            for item in v:
                lines += ["", f"[[{path}]]"]
                for ik, iv in item.items():
                    if iv is not None:
                        lines.append(f"{_key(ik)} = {_value(iv)}")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _string(k)


def _string(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"')
    out = "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in out)
    return f'"{out}"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise GemmalabError(f"cannot write {v!r} ({type(v).__name__}) to TOML")
