"""Pipeline strings: the same pipeline in the CLI, in Python and in a config file.

Grammar:

    pipeline := element ("," element)*
    element  := pass | "(" pipeline ")" ["*" INT]      # a group repeated to a fixed point (cap INT, default 10)
    pass     := NAME ["(" [option ("," option)*] ")"]
    option   := KEY "=" value
    value    := NUMBER | true | false | none | 'quoted' | "quoted" | bare-word | "[" [value ("," value)*] "]"

    fold,prune-channels(ratio=0.3,round-to=8),(fold-constants,eliminate-dead)*5
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import PipelineError
from . import registry
from .base import Pass
from .options import coerce

DEFAULT_MAX_ITERATIONS = 10

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<punct>[(),=\[\]*])
  | (?P<quoted>'[^']*'|"[^"]*")
  | (?P<word>[^\s(),=\[\]*'"]+)
""", re.VERBOSE)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")


@dataclass
class FixedPoint:
    """Passes run in order, repeatedly, until none changes the model (at most `max_iterations` rounds)."""

    passes: list["Pass | FixedPoint"]
    max_iterations: int = DEFAULT_MAX_ITERATIONS

    def __str__(self) -> str:
        inner = ",".join(str(p) for p in self.passes)
        suffix = "" if self.max_iterations == DEFAULT_MAX_ITERATIONS else f"*{self.max_iterations}"
        return f"({inner}){suffix}"


def parse_pipeline(text: str) -> list["Pass | FixedPoint"]:
    """Parse a pipeline string into pass instances (and fixed-point groups)."""
    parser = _Parser(text)
    elements = parser.pipeline()
    parser.expect_end()
    return elements


def format_pipeline(elements: list["Pass | FixedPoint"]) -> str:
    """The pipeline string of `elements` (round-trips through `parse_pipeline`)."""
    return ",".join(str(e) for e in elements)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None:  # pragma: no cover - the token classes cover every character
                self._fail(pos, "unexpected character")
            if match.lastgroup != "space":
                self.tokens.append((match.lastgroup, match.group(), pos))
            pos = match.end()
        self.i = 0
        if not self.tokens:
            raise PipelineError("empty pipeline: name at least one pass, e.g. -p fold")

    # -- helpers ------------------------------------------------------------------------------------
    def _fail(self, pos: int, why: str):
        raise PipelineError(f"bad pipeline {self.text!r} at column {pos + 1}: {why}")

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None, kind: str | None = None) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            self._fail(len(self.text), f"expected {value or kind}, found the end")
        if (value is not None and token[1] != value) or (kind is not None and token[0] != kind):
            self._fail(token[2], f"expected {value or kind}, found {token[1]!r}")
        self.i += 1
        return token

    def at(self, value: str) -> bool:
        token = self.peek()
        return token is not None and token[0] == "punct" and token[1] == value

    def expect_end(self) -> None:
        token = self.peek()
        if token is not None:
            self._fail(token[2], f"unexpected {token[1]!r}")

    # -- grammar ------------------------------------------------------------------------------------
    def pipeline(self) -> list:
        elements = [self.element()]
        while self.at(","):
            self.take(",")
            elements.append(self.element())
        return elements

    def element(self):
        if self.at("("):
            self.take("(")
            inner = self.pipeline()
            self.take(")")
            cap = DEFAULT_MAX_ITERATIONS
            if self.at("*"):
                self.take("*")
                _, word, pos = self.take(kind="word")
                if not word.isdigit() or int(word) < 1:
                    self._fail(pos, f"iteration cap must be a positive integer, not {word!r}")
                cap = int(word)
            return FixedPoint(inner, cap)
        _, name, pos = self.take(kind="word")
        if not _NAME.match(name):
            self._fail(pos, f"{name!r} is not a pass name")
        try:
            cls = registry.get(name)
        except PipelineError as exc:
            self._fail(pos, str(exc))
        raw: dict[str, tuple[Any, int]] = {}
        if self.at("("):
            self.take("(")
            if not self.at(")"):
                self.option(raw)
                while self.at(","):
                    self.take(",")
                    self.option(raw)
            self.take(")")
        return build_pass(cls, raw, self._fail)

    def option(self, raw: dict) -> None:
        _, key, pos = self.take(kind="word")
        if key in raw:
            self._fail(pos, f"option {key!r} given twice")
        self.take("=")
        raw[key] = (self.value(), pos)

    def value(self) -> Any:
        if self.at("["):
            self.take("[")
            items = []
            if not self.at("]"):
                items.append(self.value())
                while self.at(","):
                    self.take(",")
                    items.append(self.value())
            self.take("]")
            return items
        kind, text, pos = self.peek() or ("", "", len(self.text))
        if kind == "quoted":
            self.i += 1
            return text[1:-1]
        if kind != "word":
            self._fail(pos, "expected a value")
        self.i += 1
        return _literal(text)


def _literal(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def build_pass(cls: type[Pass], raw: dict[str, tuple[Any, int]], fail) -> Pass:
    """Instantiate `cls` from parsed options (key -> (value, column)), checking names and types."""
    specs = {spec.key: spec for spec in cls.options()}
    specs.update({spec.field: spec for spec in cls.options()})
    kwargs = {}
    for key, (value, pos) in raw.items():
        spec = specs.get(key)
        if spec is None:
            known = ", ".join(s.key for s in cls.options()) or "none"
            fail(pos, f"pass {cls.name} has no option {key!r} (options: {known})")
        try:
            kwargs[spec.field] = coerce(value, spec.type, f"{cls.name}: option {spec.key}")
        except PipelineError as exc:
            fail(pos, str(exc))
    return cls(**kwargs)
