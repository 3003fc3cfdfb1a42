"""Typed pass options: discovery from a pass's class annotations and coercion of pipeline values.

A pass declares its options as annotated class attributes with defaults and a trailing comment, the
comment being the option's help text:

    energy: float = 0.99          # keep this share of W's squared singular values

In pipeline strings options are written in kebab-case (`target-macs=0.7`) and map to the snake_case
field (`target_macs`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from ..errors import PipelineError


@dataclass(frozen=True)
class OptionSpec:
    """One option of a pass: its field name, pipeline spelling, type, default and help."""

    field: str
    type: Any
    default: Any
    help: str

    @property
    def key(self) -> str:
        return self.field.replace("_", "-")

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


def option_specs(cls: type) -> list[OptionSpec]:
    """The options of a pass class (a dataclass), in declaration order."""
    hints = typing.get_type_hints(cls)
    helps = dict(_comment_help(cls))
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        specs.append(OptionSpec(f.name, hints.get(f.name, Any), default, helps.get(f.name, "")))
    return specs


@functools.lru_cache(maxsize=None)
def _comment_help(cls: type) -> dict[str, str]:
    """Help text per option from the source comments (cached: reading source costs ~40 ms a class)."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+)\s*:[^=\n]+=[^#\n]*#\s*(.+)$", source, re.MULTILINE):
            helps[match.group(1)] = match.group(2).strip()
    return helps


def coerce(value: Any, kind: Any, where: str) -> Any:
    """Convert a parsed pipeline value (number, bool, str, list) to the option's declared type."""
    origin, args = get_origin(kind), get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except PipelineError:
                continue
        raise PipelineError(f"{where}: {value!r} is not a {_type_name(kind)}")
    if origin is Literal:
        if value in args:
            return value
        raise PipelineError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        inner = args[0] if args else Any
        converted = [coerce(v, inner, where) for v in items]
        return converted if origin is list else tuple(converted)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.endswith("%"):
            try:
                return float(value[:-1]) / 100.0
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(value, kind):
        return value
    raise PipelineError(f"{where}: {value!r} is not a {_type_name(kind)}")


def _type_name(kind: Any) -> str:
    origin, args = get_origin(kind), get_args(kind)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or none" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0]) if args else 'any'}"
    return getattr(kind, "__name__", str(kind))
