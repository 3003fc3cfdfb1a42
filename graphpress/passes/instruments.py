"""Instruments: checks and observations around every pass, switched on by options or environment.

- `IRDump(directory)`: writes the model after each pass (`GRAPHPRESS_DUMP_IR=dir`).
- `Checker()`: runs the onnx checker after each pass that changed the model (`GRAPHPRESS_CHECK=1`).
- `NumericCheck(rtol, atol)`: compares outputs with the model before the pass on the same inputs and
  fails the pass that broke them (`GRAPHPRESS_CHECK_NUMERICS=rtol`).
Timing is not an instrument: the manager records it for every pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from ..errors import PassError
from ..ir import Model, compare_outputs, random_inputs, run, save


class Instrument:
    """Hooks called by the pass manager; every hook is optional."""

    def start(self, model: Model, ctx) -> None:
        """Called once before the first pass."""

    def before_pass(self, pass_, model: Model, ctx) -> None:
        """Called before each pass."""

    def after_pass(self, pass_, model: Model, ctx, result) -> None:
        """Called after each pass that completed."""

    def finish(self, model: Model, ctx) -> None:
        """Called once after the last pass."""


class IRDump(Instrument):
    """Save the model after every pass as `NN-<pass>.onnx` in `directory`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.count = 0

    def start(self, model, ctx):
        save(model, self.directory / "00-input.onnx")

    def after_pass(self, pass_, model, ctx, result):
        self.count += 1
        save(model, self.directory / f"{self.count:02d}-{pass_.name}.onnx")


class Checker(Instrument):
    """Run `onnx.checker.check_model` after every pass that changed the model."""

    def after_pass(self, pass_, model, ctx, result):
        if not result.changed:
            return
        try:
            onnx.checker.check_model(model.to_onnx())
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0]
            raise PassError(f"pass {pass_.name} produced an invalid model: {first} "
                            f"[passes before it: {', '.join(ctx.history[:-1]) or 'none'}]") from exc


class NumericCheck(Instrument):
    """Fail the pass that moves any output further than `rtol` (relative to the output's magnitude)."""

    def __init__(self, rtol: float = 1e-4, atol: float = 1e-6, inputs: dict[str, np.ndarray] | None = None):
        self.rtol, self.atol, self.inputs = rtol, atol, inputs
        self.expected: dict[str, np.ndarray] | None = None

    def start(self, model, ctx):
        if self.inputs is None:
            self.inputs = random_inputs(model)
        self.expected = run(model, self.inputs)

    def after_pass(self, pass_, model, ctx, result):
        if not result.changed:
            return
        actual = run(model, self.inputs)
        comparison = compare_outputs(self.expected, actual)
        if not comparison.within(self.rtol, self.atol):
            raise PassError(f"pass {pass_.name} changed the outputs beyond rtol {self.rtol}: {comparison} "
                            f"[passes before it: {', '.join(ctx.history[:-1]) or 'none'}]")
        self.expected = actual


def instruments_from_env() -> list[Instrument]:
    """Instruments requested through GRAPHPRESS_DUMP_IR, GRAPHPRESS_CHECK, GRAPHPRESS_CHECK_NUMERICS."""
    found: list[Instrument] = []
    if os.environ.get("GRAPHPRESS_DUMP_IR"):
        found.append(IRDump(os.environ["GRAPHPRESS_DUMP_IR"]))
    if os.environ.get("GRAPHPRESS_CHECK", "") not in ("", "0"):
        found.append(Checker())
    if os.environ.get("GRAPHPRESS_CHECK_NUMERICS"):
        found.append(NumericCheck(rtol=float(os.environ["GRAPHPRESS_CHECK_NUMERICS"])))
    return found
