"""Sensitivity analysis: which quantized nodes hurt the model's output most, and which to keep float.

Each node is ranked by the output SQNR (signal-to-quantization-noise ratio, in dB) of the model with
*only that node* quantized: a low SQNR means that node alone adds much error. `keep-float=auto` then
keeps the worst nodes in float, one at a time, re-measuring the fully quantized model, until its SQNR
reaches the target (or an accuracy budget, from Python) or a cap on float nodes is hit.

SQNR is measured with onnxruntime's graph optimizations off, i.e. on the exact QDQ arithmetic, on a
few calibration batches against the float model's outputs.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Iterable

import numpy as np

from ..ir import Model, session

#: a function that builds a quantized copy of the model with the given node names kept float
Builder = Callable[[set[str]], Model]


def sqnr_db(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> float:
    """10 log10(signal power / noise power) over every float output of every batch."""
    signal = noise = 0.0
    for ref_batch, act_batch in zip(reference, actual):
        for ref, act in zip(ref_batch, act_batch):
            if np.asarray(ref).dtype.kind != "f":
                continue
            ref64, act64 = np.asarray(ref, np.float64), np.asarray(act, np.float64)
            signal += float(np.sum(ref64 ** 2))
            noise += float(np.sum((ref64 - act64) ** 2))
    if noise == 0:
        return float("inf")
    return 10 * np.log10(max(signal, 1e-30) / noise)


class OutputProbe:
    """The float model's outputs on a few calibration batches, to score quantized variants against."""

    def __init__(self, float_model: Model, batches: Iterable[dict], count: int = 2):
        self.batches = list(itertools.islice(iter(batches), count))
        self.reference = self.outputs(float_model)

    def outputs(self, model: Model) -> list[list[np.ndarray]]:
        sess = session(model)
        return [sess.run(None, batch) for batch in self.batches]

    def sqnr(self, model: Model) -> float:
        return sqnr_db(self.reference, self.outputs(model))


def rank_by_sensitivity(nodes: list[str], build: Builder, probe: OutputProbe,
                        log: logging.Logger | None = None) -> list[tuple[str, float]]:
    """[(node, SQNR with only it quantized)], the most harmful (lowest SQNR) first."""
    from tqdm.auto import tqdm
    everything = set(nodes)
    scores = []
    for name in tqdm(nodes, desc="sensitivity", unit="node", leave=False):
        scores.append((name, probe.sqnr(build(everything - {name}))))
        if log:
            log.debug("sensitivity: %s alone -> %.1f dB", name, scores[-1][1])
    return sorted(scores, key=lambda item: item[1])


def choose_float_nodes(ranked: list[tuple[str, float]], build: Builder, probe: OutputProbe,
                       target_sqnr: float, max_float: int, accept: Callable[[Model], bool] | None = None,
                       log: logging.Logger | None = None) -> tuple[list[str], float]:
    """Keep the most sensitive nodes float until `accept(model)` (default: SQNR >= target) holds.

    Returns the node names to keep float and the SQNR reached.
    """
    keep: list[str] = []
    while True:
        model = build(set(keep))
        reached = probe.sqnr(model)
        ok = accept(model) if accept is not None else reached >= target_sqnr
        if log:
            log.info("keep-float=auto: %d float node(s) -> %.1f dB%s", len(keep), reached, "" if ok else " (short)")
        if ok or len(keep) >= min(max_float, len(ranked)):
            return keep, reached
        keep.append(ranked[len(keep)][0])
