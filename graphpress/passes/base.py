"""What a pass is: a small dataclass with a registered name, typed options and a `run` method.

    @register("drop-identity")
    class DropIdentity(Pass):
        \"\"\"Remove Identity nodes.\"\"\"

        keep_outputs: bool = True      # keep Identities that produce graph outputs

        def run(self, model, ctx):
            ...
            return PassResult(changed=n > 0, stats={"removed": n})

Passes keep no state on `self` between runs: per-run state lives in locals or in the `PassContext`,
which also caches analyses (computed once, dropped when a pass changes the graph).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import onnx_graphsurgeon as gs

from ..ir import Model
from .options import OptionSpec, coerce, option_specs


@dataclass
class PassResult:
    """What a pass did: whether it changed the model, and counts worth reporting."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """Shared state for one pipeline run: calibration data, logging, analysis cache, where we are."""

    #: an iterable of {input name: array} dicts, for passes that look at real activations
    calibration: Iterable[dict] | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("graphpress.passes"))
    #: names of the passes that have run so far, in order
    history: list[str] = field(default_factory=list)
    #: the node the running pass is working on (named in errors)
    current_node: gs.Node | None = None
    #: reports passes leave for the user (e.g. a pruning report), by pass name
    reports: dict[str, Any] = field(default_factory=dict)
    _analyses: dict[Any, Any] = field(default_factory=dict)

    def analysis(self, key: Any, compute: Callable[[], Any]) -> Any:
        """The cached result for `key`, computed by `compute()` on first use since the last change."""
        if key not in self._analyses:
            self._analyses[key] = compute()
        return self._analyses[key]

    def invalidate(self) -> None:
        """Forget every cached analysis (the graph changed)."""
        self._analyses.clear()

    @contextlib.contextmanager
    def at(self, node: gs.Node) -> Iterator[gs.Node]:
        """Mark `node` as the one being worked on, so a failure names it (it stays marked on error)."""
        previous, self.current_node = self.current_node, node
        yield node
        self.current_node = previous


class Pass:
    """Base class of every pass. Subclasses are made dataclasses: their annotated fields are options."""

    #: the registered name (set by `register`)
    name: ClassVar[str] = ""
    #: a pass that only reads the graph, or keeps every analysis valid, sets this
    preserves_analyses: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(kw_only=True)(cls)
        _check_option_types(cls)

    def run(self, model: Model, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name} does not implement run()")

    @classmethod
    def options(cls) -> list[OptionSpec]:
        return option_specs(cls)

    @classmethod
    def summary(cls) -> str:
        """First line of the docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __str__(self) -> str:
        """The pass in pipeline syntax, with options that differ from their defaults."""
        changed = [f"{spec.key}={_format_value(getattr(self, spec.field))}" for spec in self.options()
                   if getattr(self, spec.field) != spec.default]
        return f"{self.name}({','.join(changed)})" if changed else self.name


def _check_option_types(cls: type) -> None:
    """Validate option values given from Python on construction, the same way the parser does."""
    original_init = cls.__init__

    def __init__(self, **kwargs):
        specs = {s.field: s for s in option_specs(cls)} if kwargs else {}
        for key, value in kwargs.items():
            if key in specs:
                kwargs[key] = coerce(value, specs[key].type, f"{cls.name or cls.__name__}: option {specs[key].key}")
        original_init(self, **kwargs)

    __init__.__doc__ = original_init.__doc__
    cls.__init__ = __init__


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def function_pass(name: str, preserves_analyses: bool = False):
    """Register a function `fn(model, ctx) -> PassResult | bool` as a pass without options.

    The function's docstring becomes the pass's help.
    """
    from .registry import register

    def decorate(fn: Callable[[Model, PassContext], PassResult | bool]):
        def run(self, model: Model, ctx: PassContext) -> PassResult:
            result = fn(model, ctx)
            return result if isinstance(result, PassResult) else PassResult(changed=bool(result))

        cls = type(fn.__name__, (Pass,), {"run": run, "__doc__": fn.__doc__,
                                          "preserves_analyses": preserves_analyses,
                                          "__module__": fn.__module__})
        register(name)(cls)
        fn.pass_class = cls
        return fn

    return decorate
