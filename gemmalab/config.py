"""Dataclass configs from TOML: typed tables, `key=value` overrides, errors that name the file and key.

`from_table(cls, table, where)` builds a dataclass from a parsed TOML table, checking each value
against the field's type hint: ints widen to floats, lists become tuples where the hint says tuple,
`X | None` accepts None, nested dataclasses are tables that override their defaults key by key,
`dict[K, V]` and `list[X]` are checked item by item. Unknown keys and wrong types raise GemmalabError
naming `where` (the file) and the dotted key.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from gemmalab.errors import GemmalabError

__all__ = ["from_table", "convert", "type_name", "read_toml", "parse_overrides", "apply_overrides"]


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The parsed TOML file; a missing file or invalid TOML is a GemmalabError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise GemmalabError(f"{what} not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise GemmalabError(f"{p}: invalid TOML: {e}") from None


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
        except tomllib.TOMLDecodeError:
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


def from_table(cls, table: Any, where: str, prefix: str = "", template=None, *, quote: str = "`",
               false_is_none: bool = False):
    """`cls` from a TOML table. A table overrides `template` (by default the field defaults) key by key,
    so `[quality.code]` with one key keeps the other code defaults. `where` names the source in errors,
    `prefix` is the table's dotted key, `quote` wraps keys in messages. With `false_is_none`, `false`
    sets an optional field to None (TOML has no null: `rule = false` switches an optional rule off)."""
    where_key = f"{quote}{prefix or 'top level'}{quote}"
    if not isinstance(table, dict):
        raise GemmalabError(f"{where}: {where_key} must be a table, got {table!r}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # annotations that cannot be resolved: accept values as given
        hints = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in fields:
            raise GemmalabError(f"{where}: unknown key {quote}{key}{quote}; known keys here: {', '.join(sorted(fields))}")
        kwargs[k] = convert(hints.get(k, Any), v, key, where, _default(fields[k], template),
                            quote=quote, false_is_none=false_is_none)
    try:
        return dataclasses.replace(template, **kwargs) if template is not None else cls(**kwargs)
    except (GemmalabError, TypeError, ValueError) as e:
        raise GemmalabError(f"{where}: {where_key}: {e}") from None


def _default(f: dataclasses.Field, template) -> Any:
    """The value a table for field `f` overrides: the template's, else the field's default."""
    if template is not None:
        return getattr(template, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def convert(hint: Any, value: Any, key: str, where: str, template=None, *, quote: str = "`",
            false_is_none: bool = False) -> Any:
    """`value` checked against the type `hint`; `key` (dotted) and `where` name it in errors."""
    opts = {"quote": quote, "false_is_none": false_is_none}

    def fail(what: str | None = None) -> GemmalabError:
        return GemmalabError(f"{where}: {quote}{key}{quote} must be {what or type_name(hint)}, got {value!r}")

    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (false_is_none and value is False and bool not in args)):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return convert(inner[0], value, key, where, template, **opts)
        for arg in inner:
            try:
                return convert(arg, value, key, where, template, **opts)
            except GemmalabError:
                continue
        raise fail()
    if dataclasses.is_dataclass(hint):
        return from_table(hint, value, where, key, template, **opts)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise fail()
            return tuple(convert(a, v, f"{key}[{i}]", where, **opts) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [convert(item, v, f"{key}[{i}]", where, **opts) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise fail("a table")
        if not args:
            return value
        kt, vt = args
        try:
            return {kt(k): convert(vt, v, f"{key}.{k}", where, **opts) for k, v in value.items()}
        except ValueError:
            raise GemmalabError(f"{where}: keys of {quote}{key}{quote} must be {type_name(kt)}") from None
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
