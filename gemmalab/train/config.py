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
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    chunk_size: int = 4096  # tokens per chunk of the output projection + cross-entropy
    init_std: float = 0.02
    log_every: int = 1
    max_bad_steps: int = 5  # non-finite steps in a row before the run stops
    seed: int = 0  # weight init
    device: str = "auto"  # "auto": CUDA when available, else CPU (ignored under torchrun)
    threads: int = 0  # CPU threads (torch.set_num_threads); 0: torch's default
    debug_nan_steps: list[int] = field(default_factory=list)  # tests: NaN injected into these steps' activations
    debug_hang_at_step: int = 0  # tests: after this step, write OUT/hang-STEP and wait for a signal


@dataclass
class CheckpointSection:
    """Train-state checkpoints (DCP) under OUT/checkpoints/."""

    every: int = 100  # steps; 0: only at the end and on SIGTERM
    keep: int = 2  # newest complete checkpoints kept


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
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise GemmalabError(f"Config file {p} does not exist.")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise GemmalabError(f"{p}: invalid TOML: {e}.") from None
    if overrides:
        items = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        for key, value in items.items():
            _set_dotted(data, key, value, "command line")
        source += " (with command-line overrides)"
    return from_dict(data, source)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["train.steps=10", "train.dtype=bf16"]` -> `{"train.steps": 10, "train.dtype": "bf16"}`."""
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise GemmalabError(f"Override {arg!r} is not of the form key=value (e.g. train.steps=100).")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # bare words are strings: train.dtype=bf16
        out[key] = value
    return out


def _set_dotted(data: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise GemmalabError(f"{source}: cannot set {key!r}: {part!r} is not a table.")
    node[parts[-1]] = value


def from_dict(data: dict, source: str = "config") -> TrainConfig:
    """Build and validate a TrainConfig from the parsed TOML layout."""
    known = {"out_dir", "model", *_SECTIONS}
    for key in data:
        if key not in known:
            raise GemmalabError(f"{source}: unknown key {key!r}; known top-level keys and sections: {', '.join(sorted(known))}.")
    kwargs: dict[str, Any] = {}
    if "out_dir" in data:
        kwargs["out_dir"] = _coerce(data["out_dir"], str, source, "out_dir")
    kwargs["model"] = _model_section(data.get("model", {}), source)
    kwargs["train"] = _section(TrainSection, data.get("train", {}), source, "train")
    optim = data.get("optim", {})
    if isinstance(optim, dict) and "total_steps" not in optim:  # the schedule spans the run unless told otherwise
        optim = {**optim, "total_steps": kwargs["train"].steps}
    kwargs["optim"] = _section(OptimConfig, optim, source, "optim")
    for name, cls in _SECTIONS.items():
        if name not in kwargs:
            kwargs[name] = _section(cls, data.get(name, {}), source, name)
    cfg = TrainConfig(**kwargs)
    _validate(cfg, source)
    return cfg


def _model_section(table: Any, source: str) -> ModelSection:
    if not isinstance(table, dict):
        raise GemmalabError(f"{source}: [model] must be a table.")
    table = dict(table)
    preset = _coerce(table.pop("preset", ModelSection.preset), str, source, "model.preset")
    hints = typing.get_type_hints(ModelConfig)
    overrides = {}
    for key, value in table.items():
        if key not in hints:
            raise GemmalabError(f"{source}: unknown key 'model.{key}'; [model] takes 'preset' and the ModelConfig "
                                f"fields {', '.join(sorted(hints))}.")
        overrides[key] = _coerce(value, hints[key], source, f"model.{key}")
    section = ModelSection(preset, overrides)
    section.build()  # unknown preset or an invalid shape fails here, at load time
    return section


def _section(cls: type, table: Any, source: str, name: str):
    if not isinstance(table, dict):
        raise GemmalabError(f"{source}: [{name}] must be a table.")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # annotations that cannot be resolved: accept values as given
        hints = {f.name: Any for f in dataclasses.fields(cls)}
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in fields:
            raise GemmalabError(f"{source}: unknown key '{name}.{key}'; known keys in [{name}]: {', '.join(sorted(fields))}.")
        kwargs[key] = _coerce(value, hints.get(key, Any), source, f"{name}.{key}")
    try:
        return cls(**kwargs)
    except GemmalabError as e:
        raise GemmalabError(f"{source}: [{name}]: {e}") from None
    except (TypeError, ValueError) as e:
        raise GemmalabError(f"{source}: [{name}]: {e}.") from None


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    """`value` checked against the type `hint` (ints widen to floats, lists become tuples where asked)."""
    def fail() -> GemmalabError:
        return GemmalabError(f"{source}: {key} must be {_type_name(hint)}, got {value!r}.")

    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, source, key)
            except GemmalabError:
                continue
        raise fail()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise fail()
            return tuple(_coerce(v, a, source, key) for v, a in zip(value, args))
        item = args[0] if args else Any
        items = [_coerce(v, item, source, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise fail()
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise fail()
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _validate(cfg: TrainConfig, source: str) -> None:
    t, d, c = cfg.train, cfg.data, cfg.checkpoint
    problems = []
    for key, value in (("train.steps", t.steps), ("train.grad_accum", t.grad_accum), ("data.batch_size", d.batch_size),
                       ("data.seq_len", d.seq_len), ("train.chunk_size", t.chunk_size), ("train.log_every", t.log_every),
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
