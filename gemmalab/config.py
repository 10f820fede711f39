"""The one config API: stage configs are dataclasses, loaded from TOML with `key=value` overrides and written back.

    cfg = load(PretrainConfig, "configs/train/tiny.toml", ["train.steps=60"])   # typed, validated, resolved
    dump(cfg, run_dir)                                                          # run_dir/config.toml

Values are checked against the fields' type hints: ints widen to floats, lists become tuples where the hint
says tuple, `X | None` accepts None (and `false`, since TOML has no null: `rule = false` switches an optional
rule off), nested dataclasses are tables that override their defaults key by key, `dict[K, V]` and `list[X]`
are checked item by item, and a `torch.dtype` takes either spelling (`bf16`, `bfloat16`). Unknown keys and wrong
types raise GemmalabError naming the file and the dotted key; a dataclass's `__post_init__` validates its
values, naming fields in backticks (its GemmalabError "`steps` must be >= 1" of [train] is reported as
"FILE: `train.steps` must be >= 1"). A dataclass whose TOML layout is not its
fields (a model preset with field overrides, a mixture) defines `from_toml(table, where, key)` and `to_toml()`.
`load(Cls, dump(cfg)) == cfg`: the snapshot repeats the run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch

from gemmalab.dtypes import DTYPE_CHOICES, dtype_name, parse_dtype
from gemmalab.errors import GemmalabError

T = TypeVar("T")

__all__ = ["load", "dump", "to_table", "to_toml", "from_table", "convert", "type_name", "read_toml", "parse_overrides",
           "apply_overrides"]


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The parsed TOML file; a missing file or invalid TOML is a GemmalabError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise GemmalabError(f"{what} not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:  # TOML is UTF-8 by definition
        raise GemmalabError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            f"TOML files must be UTF-8") from None
    except ValueError as e:  # TOMLDecodeError, or an integer over Python's 4,300-digit limit
        raise GemmalabError(f"{p}: invalid TOML: {e}") from None
    except RecursionError:  # arrays or inline tables nested thousands deep
        raise GemmalabError(f"{p}: invalid TOML here: nested too deeply") from None


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["train.steps=10", "train.dtype=bf16"]` -> `{"train.steps": 10, "train.dtype": "bf16"}`.

    Values are read as TOML values; anything that is not valid TOML is taken as a string.
    """
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise GemmalabError(f"Override {arg!r} is not of the form key=value (e.g. train.steps=100).")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except (ValueError, RecursionError):  # not TOML (or too big or deep for the parser)
            value = raw.strip()  # bare words are strings: train.dtype=bf16
        out[key] = value
    return out


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any], source: str = "command line") -> None:
    """Set each dotted key (`train.steps`) of `overrides` (`key=value` strings or a dict) in `data`."""
    items = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
    for key, value in items.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise GemmalabError(f"{source}: cannot set {key!r}: {part!r} is not a table.")
        node[last] = value


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> T:
    """A `cls` config from a TOML file (None: all defaults) with dotted `key=value` overrides applied.

    Overrides are typed: the value is read as a TOML value (`train.steps=10`, `optim.lr=3e-4`,
    `data.shards=["a","b"]`); anything that is not valid TOML is a string (`train.dtype=bf16`).
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    if overrides:
        apply_overrides(data, overrides, "command line")
        source += " (with command-line overrides)"
    return from_table(cls, data, source)


def dump(cfg: Any, path: str | Path, header: str = "") -> Path:
    """Write the resolved config as TOML, atomically: to `path`, or to `path/config.toml` when `path` is a folder.
    Returns the file written."""
    from gemmalab.files import atomic_write

    path = Path(path)
    if path.is_dir():
        path = path / "config.toml"
    return atomic_write(path, to_toml(cfg, header))


def from_table(cls, table: Any, where: str, prefix: str = "", template=None):
    """`cls` from a TOML table. A table overrides `template` (by default the field defaults) key by key,
    so `[quality.code]` with one key keeps the other code defaults. `where` names the source in errors,
    `prefix` is the table's dotted key."""
    if hasattr(cls, "from_toml"):
        try:
            return cls.from_toml(table, where, prefix)
        except GemmalabError as e:
            raise _located(e, where, prefix, cls) from None
    if not isinstance(table, dict):
        raise GemmalabError(f"{where}: `{prefix or 'top level'}` must be a table, got {table!r}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # annotations that cannot be resolved: accept values as given
        hints = {}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in fields:
            raise GemmalabError(f"{where}: unknown key `{key}`; known keys here: {', '.join(sorted(fields))}")
        kwargs[k] = convert(hints.get(k, Any), v, key, where, _default(fields[k], template))
    try:
        return dataclasses.replace(template, **kwargs) if template is not None else cls(**kwargs)
    except (GemmalabError, TypeError, ValueError) as e:
        raise _located(e, where, prefix, cls) from None


def _located(e: Exception, where: str, prefix: str, cls=None) -> GemmalabError:
    """A validation error of the table `prefix` of `where`, named as such: "`steps` must be >= 1" from [train]
    becomes "FILE: `train.steps` must be >= 1"; a message naming no field gets "FILE: [train] ..."."""
    text = str(e)
    if text.startswith(where):
        return GemmalabError(text)
    named = False
    if prefix and cls is not None and dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f"`{f.name}`" in text:
                text, named = text.replace(f"`{f.name}`", f"`{prefix}.{f.name}`"), True
    return GemmalabError(f"{where}: {text}" if named or not prefix else f"{where}: [{prefix}] {text}")


def _default(f: dataclasses.Field, template) -> Any:
    """The value a table for field `f` overrides: the template's, else the field's default."""
    if template is not None:
        return getattr(template, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def convert(hint: Any, value: Any, key: str, where: str, template=None) -> Any:
    """`value` checked against the type `hint`; `key` (dotted) and `where` name it in errors."""

    def fail(what: str | None = None) -> GemmalabError:
        return GemmalabError(f"{where}: `{key}` must be {what or type_name(hint)}, got {value!r}")

    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (value is False and bool not in args)):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return convert(inner[0], value, key, where, template)
        for arg in inner:
            try:
                return convert(arg, value, key, where, template)
            except GemmalabError:
                continue
        raise fail()
    if hint is torch.dtype:
        try:
            return parse_dtype(value)
        except GemmalabError:
            raise fail(f"one of {', '.join(DTYPE_CHOICES)}") from None
    if dataclasses.is_dataclass(hint) or hasattr(hint, "from_toml"):
        return from_table(hint, value, where, key, template)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise fail()
            return tuple(convert(a, v, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [convert(item, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise fail("a table")
        if not args:
            return value
        kt, vt = args
        try:
            return {kt(k): convert(vt, v, f"{key}.{k}", where) for k, v in value.items()}
        except ValueError:
            raise GemmalabError(f"{where}: keys of `{key}` must be {type_name(kt)}") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if (hint is int and isinstance(value, bool)) or (isinstance(hint, type) and not isinstance(value, hint)):
        raise fail()
    return value


def type_name(hint: Any) -> str:
    """`int`, `list[str]`, `float | None`: the type as a reader writes it."""
    if not typing.get_args(hint):
        return getattr(hint, "__name__", str(hint))
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(hint))  # typing.Optional[a.b.C] -> Optional[C]


# ---- writing ----------------------------------------------------------------------------------


def to_table(cfg: Any) -> Any:
    """A config as plain TOML data: dataclasses as tables (their `to_toml()` where they have one), dtypes by
    their short names, tuples as lists. None stays None where it is the field's default (written as a comment)
    and becomes `false` elsewhere (`load` reads `false` back as None)."""
    if hasattr(cfg, "to_toml"):
        return to_table(cfg.to_toml())
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        out = {}
        for f in dataclasses.fields(cfg):
            if not f.init:
                continue  # derived from the others
            value = getattr(cfg, f.name)
            out[f.name] = False if value is None and _default(f, None) is not None else to_table(value)
        return out
    if isinstance(cfg, torch.dtype):
        return dtype_name(cfg)
    if isinstance(cfg, dict):
        return {str(k): to_table(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_table(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def to_toml(cfg: Any, header: str = "") -> str:
    """The config as TOML text (`header` as a first comment line)."""
    lines = [f"# {header}"] if header else []
    _write_items(lines, "", to_table(cfg))
    return "\n".join(lines).lstrip("\n") + "\n"


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _write_items(lines: list[str], prefix: str, table: dict, inline_tables: bool = False) -> None:
    """`table`'s plain values, then its tables as [sections] and lists of tables as [[arrays]]. Inside an array's
    tables (`inline_tables`), tables are written inline: `weights = { web = 0.3, code = 0.7 }`."""
    plain = {k: v for k, v in table.items()
             if (inline_tables or not isinstance(v, dict)) and not _is_table_array(v)}
    for k, v in plain.items():
        lines.append(f"# {_key(k)} = (unset)" if v is None else f"{_key(k)} = {_value(v)}")
    for k, v in table.items():
        if k in plain:
            continue
        path = f"{prefix}{_key(k)}"
        if isinstance(v, dict):
            if not v or any(not isinstance(x, dict) and not _is_table_array(x) for x in v.values()):
                lines += ["", f"[{path}]"]  # a table with only sub-tables needs no header of its own
            _write_items(lines, path + ".", v)
        else:
            for item in v:
                lines += ["", f"[[{path}]]"]
                _write_items(lines, path + ".", item, inline_tables=True)


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
