"""Dataclass configs <-> command-line flags, dicts and YAML files, with strict checking.

Every field becomes `--field-name`; unknown keys are errors with a suggestion, so a typo never
silently runs the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool, bool]:
    """(element type, is_list, is_optional) of a field annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    optional = False
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        non_none = [a for a in args if a is not type(None)]
        optional = len(non_none) < len(args)
        tp = non_none[0]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        return args[0] if args else str, True, optional
    return tp, False, optional


def _parse_scalar(tp: Any, text: str) -> Any:
    if tp is bool:
        low = str(text).lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    return tp(text)


def coerce(cls: type, name: str, value: Any) -> Any:
    """Convert `value` (from a flag, YAML or JSON) to the type of field `name`, or raise."""
    hints = typing.get_type_hints(cls)
    tp, is_list, optional = _base_type(hints[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if not optional:
            raise ValueError(f"{name} cannot be None")
        return None
    try:
        if is_list:
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v != ""]
            return [_parse_scalar(tp, v) if isinstance(v, str) else tp(v) for v in items]
        if isinstance(value, str):
            return _parse_scalar(tp, value)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, tp):
            raise TypeError(f"expected {tp.__name__}, got {type(value).__name__}")
        return value
    except (TypeError, ValueError) as e:
        raise ValueError(f"config field {name!r}: cannot use {value!r} ({e})") from None


def from_dict(cls: type[T], d: dict[str, Any], *, source: str = "config") -> T:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{source}: unknown config key(s) {', '.join(hints)}. Known keys: {', '.join(names)}")
    return cls(**{k: coerce(cls, k, v) for k, v in d.items()})


def load_file(cls: type[T], path: str | Path, **overrides: Any) -> T:
    """A config from a YAML or JSON file (e.g. a saved run's config.json), plus overrides."""
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    return from_dict(cls, {**(data or {}), **overrides}, source=str(path))


def add_arguments(parser: argparse.ArgumentParser, cls: type, docs: dict[str, str] | None = None) -> None:
    """One `--flag` per field, defaulting to None so only flags actually given override."""
    docs = docs or {}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                            help=f"{docs.get(f.name, '')} (default: {default})")


def from_args(cls: type[T], args: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return from_dict(cls, {**(base or {}), **given}, source="command line")


def field_docs(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the class source: the flag's help text."""
    import inspect
    import re

    docs = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return docs
    for m in re.finditer(r"^\s+(\w+):[^=\n]+=[^#\n]*#\s*(.+)$", src, re.M):
        docs[m.group(1)] = m.group(2).strip()
    return docs
