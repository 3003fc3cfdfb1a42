"""Measurements taken after every compression stage: size, parameters, MACs, latency, metric."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..ir import Model, random_inputs
from ..summary import summarize
from .evaluate import Evaluator, OnnxRunnable, Runnable

#: latency is the median of this many timed runs after WARMUP untimed ones
RUNS, WARMUP = 30, 5


@dataclass
class StageMeasure:
    """One row of the report: a stage's model and how it measures."""

    stage: str
    pipeline: str
    size_bytes: int
    parameters: int
    macs: int
    nodes: int
    latency_ms: float | None
    metric: float | None
    seconds: float = 0.0  # time the stage's passes (or compilation) took

    def as_dict(self) -> dict:
        return asdict(self)


def measure_model(stage: str, pipeline: str, model: Model, evaluator: Evaluator | None,
                  seconds: float = 0.0, threads: int = 1, metric: float | None = None) -> StageMeasure:
    """Measure an ONNX model: static facts, onnxruntime latency at batch 1, and the metric (computed by
    `evaluator`, or `metric` when the caller already scored this model)."""
    summary = summarize(model)
    runnable = OnnxRunnable(model, threads=threads)
    if evaluator is not None:
        metric = evaluator(runnable)
    return StageMeasure(stage, pipeline, summary.size_bytes, summary.parameters, summary.total_macs, summary.nodes,
                        latency_ms(runnable, random_inputs(model, seed=1)), metric, seconds)


def latency_ms(runnable: Runnable, inputs: dict[str, np.ndarray]) -> float:
    """Median wall time of one `run` call, in milliseconds."""
    for _ in range(WARMUP):
        runnable.run(inputs)
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        runnable.run(inputs)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
