"""The registry of passes by name: what `graphpress passes` lists and pipeline strings look up."""

from __future__ import annotations

import difflib
import importlib

from ..errors import PipelineError
from .base import Pass

_PASSES: dict[str, type[Pass]] = {}

#: modules whose import registers the built-in passes (imported on first registry lookup)
BUILTIN_MODULES = (
    "graphpress.passes.fold",
    "graphpress.passes.fold_constants",
    "graphpress.passes.fold_shapes",
    "graphpress.passes.inline_if",
    "graphpress.passes.cleanup",
    "graphpress.passes.fusion",
    "graphpress.passes.qdq",
    "graphpress.passes.prune_channels",
    "graphpress.passes.svd_split",
)


def register(name: str):
    """Class decorator: register a `Pass` subclass under `name` (kebab-case)."""

    def decorate(cls: type[Pass]) -> type[Pass]:
        if not isinstance(cls, type) or not issubclass(cls, Pass):
            raise TypeError(f"register({name!r}) needs a Pass subclass, got {cls!r}")
        existing = _PASSES.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"pass name {name!r} is already registered by {existing.__qualname__}")
        cls.name = name
        _PASSES[name] = cls
        return cls

    return decorate


def _load_builtins(until: str | None = None) -> None:
    """Import the built-in pass modules in order; with `until`, stop once that pass is registered
    (so `-p fold` does not pay for importing scipy and the quantizer)."""
    for module in BUILTIN_MODULES:
        if until is not None and until in _PASSES:
            return
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real import error inside an existing pass module
                raise


def get(name: str) -> type[Pass]:
    """The pass class registered as `name`; an unknown name suggests the closest known ones."""
    _load_builtins(until=name)
    if name not in _PASSES:
        close = difflib.get_close_matches(name, list(_PASSES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known passes: {', '.join(sorted(_PASSES))}"
        raise PipelineError(f"unknown pass {name!r}{hint}")
    return _PASSES[name]


def all_passes() -> dict[str, type[Pass]]:
    """Every registered pass, by name, sorted."""
    _load_builtins()
    return dict(sorted(_PASSES.items()))
