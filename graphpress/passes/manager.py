"""The pass manager: runs passes in order, repeats groups to a fixed point, calls instruments.

Errors are re-raised as `PassError` naming the pass, the node it was working on (`ctx.at(node)`) and
the passes that ran before it, with the original exception chained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..errors import GraphpressError, PassError
from ..ir import Model
from .base import Pass, PassContext, PassResult
from .instruments import Instrument, instruments_from_env
from .pipeline import FixedPoint, format_pipeline, parse_pipeline


@dataclass
class PassRecord:
    """One execution of one pass: what it did and how long it took."""

    name: str
    pipeline_form: str
    changed: bool
    stats: dict[str, Any]
    seconds: float
    nodes_before: int
    nodes_after: int
    iteration: int = 0


@dataclass
class PassManager:
    """Runs a pipeline (a string or a list of passes and `FixedPoint` groups) over a model."""

    passes: Sequence[Pass | FixedPoint] | str
    instruments: list[Instrument] = field(default_factory=list)
    records: list[PassRecord] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.passes, str):
            self.passes = parse_pipeline(self.passes)
        self.passes = list(self.passes)
        self.instruments = list(self.instruments) + instruments_from_env()

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.passes)

    def run(self, model: Model, ctx: PassContext | None = None,
            calibration: Iterable[dict] | None = None) -> Model:
        """Apply the pipeline to `model` in place and return it. Records land in `self.records`."""
        ctx = ctx or PassContext(calibration=calibration)
        if calibration is not None:
            ctx.calibration = calibration
        for instrument in self.instruments:
            instrument.start(model, ctx)
        self._run_sequence(self.passes, model, ctx, iteration=0)
        for instrument in self.instruments:
            instrument.finish(model, ctx)
        return model

    def _run_sequence(self, elements, model: Model, ctx: PassContext, iteration: int) -> bool:
        changed = False
        for element in elements:
            if isinstance(element, FixedPoint):
                changed |= self._run_fixed_point(element, model, ctx)
            else:
                changed |= self._run_pass(element, model, ctx, iteration).changed
        return changed

    def _run_fixed_point(self, group: FixedPoint, model: Model, ctx: PassContext) -> bool:
        changed_any = False
        for iteration in range(1, group.max_iterations + 1):
            if not self._run_sequence(group.passes, model, ctx, iteration):
                return changed_any
            changed_any = True
        ctx.log.info("fixed-point group %s stopped at its cap of %d rounds", group, group.max_iterations)
        return changed_any

    def _run_pass(self, pass_: Pass, model: Model, ctx: PassContext, iteration: int) -> PassResult:
        for instrument in self.instruments:
            instrument.before_pass(pass_, model, ctx)
        nodes_before = len(model.graph.nodes)
        ctx.current_node = None
        start = time.perf_counter()
        try:
            result = pass_.run(model, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"run() returned {type(result).__name__}, not PassResult")
        except Exception as exc:
            raise _pass_error(pass_, ctx, exc) from exc
        seconds = time.perf_counter() - start
        ctx.history.append(pass_.name)
        if result.changed and not pass_.preserves_analyses:
            ctx.invalidate()
        self.records.append(PassRecord(pass_.name, str(pass_), result.changed, dict(result.stats), seconds,
                                       nodes_before, len(model.graph.nodes), iteration))
        for instrument in self.instruments:
            try:
                instrument.after_pass(pass_, model, ctx, result)
            except PassError:
                raise
            except Exception as exc:
                raise _pass_error(pass_, ctx, exc, during=type(instrument).__name__) from exc
        return result


def _pass_error(pass_: Pass, ctx: PassContext, exc: Exception, during: str | None = None) -> PassError:
    if isinstance(exc, PassError):
        return exc
    where = ""
    if ctx.current_node is not None:
        node = ctx.current_node
        where = f" on node {node.name or '<unnamed>'!r} ({node.op})"
    before = ", ".join(ctx.history) or "none"
    kind = "" if isinstance(exc, GraphpressError) else f"{type(exc).__name__}: "
    check = f" (check {during} after it)" if during else ""
    return PassError(f"pass {pass_.name} failed{where}{check}: {kind}{exc} [passes before it: {before}]")


def run_pipeline(model: Model, pipeline: str | Sequence[Pass | FixedPoint], calibration=None,
                 instruments: list[Instrument] | None = None) -> Model:
    """Convenience: apply `pipeline` to `model` in place and return it."""
    return PassManager(pipeline, instruments=instruments or []).run(model, calibration=calibration)
