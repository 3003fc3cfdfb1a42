"""Calibration: the range of every tensor to quantize, from calibration batches, in bounded memory.

Statistics are accumulated batch by batch through `graphpress.ir.activation_batches`, so only one
batch's activations exist at a time. Histogram methods (percentile, entropy, MSE) take a second pass:
the first finds each tensor's min/max, which fixes the histogram's range for the second.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..errors import GraphpressError
from ..ir import Model, activation_batches
from .observers import HISTOGRAM_METHODS, METHODS, Histogram, MinMax, MovingAverageMinMax, select_range


def require_calibration(batches: Iterable[dict] | None, what: str) -> Iterable[dict]:
    """The calibration data, or a clear error telling the user how to give it."""
    if batches is None:
        raise GraphpressError(
            f"{what} needs calibration data: pass --calib FILE.npz|DIR on the command line, or "
            "calibration=<iterable of {input name: array}> to PassManager.run() in Python")
    return batches


def collect_ranges(model: Model, names: list[str], batches: Iterable[dict], method: str = "minmax",
                   qtype: str = "int8", symmetric: bool = False, percentile: float = 99.999
                   ) -> dict[str, tuple[float, float]]:
    """{tensor name: (lo, hi)} over all calibration batches, chosen by the observer `method`."""
    if method not in METHODS:
        raise GraphpressError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if not names:
        return {}
    make = MovingAverageMinMax if method == "moving-average" else MinMax
    observers = {name: make() for name in names}
    seen = 0
    for values in activation_batches(model, names, batches, progress=f"calibrating ({method}, pass 1)"):
        seen += 1
        for name in names:
            observers[name].observe(np.asarray(values[name]))
    if seen == 0:
        raise GraphpressError("the calibration data is empty (no batches)")
    ranges = {name: obs.range() for name, obs in observers.items()}
    if method not in HISTOGRAM_METHODS:
        return ranges
    histograms = {name: Histogram(*ranges[name]) for name in names}
    for values in activation_batches(model, names, batches, progress=f"calibrating ({method}, pass 2)"):
        for name in names:
            histograms[name].observe(values[name])
    return {name: select_range(method, hist, qtype, symmetric, percentile) for name, hist in histograms.items()}


def channel_absmax(model: Model, names: list[str], batches: Iterable[dict], what: str = "channel ranges"
                   ) -> dict[str, np.ndarray]:
    """{tensor name: max |x| per channel (the last axis)} over all calibration batches."""
    result: dict[str, np.ndarray] = {}
    for values in activation_batches(model, names, batches, progress=f"calibrating ({what})"):
        for name in names:
            value = np.abs(np.asarray(values[name], dtype=np.float32))
            batch_max = value.reshape(-1, value.shape[-1]).max(axis=0)
            result[name] = np.maximum(result[name], batch_max) if name in result else batch_max
    if len(result) < len(set(names)):
        raise GraphpressError("the calibration data is empty (no batches)")
    return result
