"""Per-group sensitivity scan, and per-group ratios under a global MACs/params budget.

Removing a channel is, for the function the model computes, the same as zeroing the input columns of
every consumer that reads it (graph outputs are frozen, so every path ends in consumers). The scan uses
that: for each group and each candidate ratio it zeroes those columns in place, runs the model on the
calibration data, and records how far the outputs moved (KL divergence for probability outputs, else the
relative squared error) and the cost saved. With the re-fit-aware criterion the consumers also carry,
during the run, the weights the least-squares re-fit would give them (from `obs.eliminate`), so the scan
measures the damage that is left after reconstruction, not before. A greedy allocation then raises, one
step at a time, the ratio of the group that saves the most cost per unit of added error,
until the estimated cost meets the target.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model, session
from .groups import ChannelGraph
from .obs import Refits
from .plan import CostModel, keep_masks, kept_count, ratios_for_target, select
from .reconstruct import LAYERS

log = logging.getLogger("graphpress.pruning")

#: candidate ratios of the scan
STEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def steps_for(cg: ChannelGraph, round_to: int = 1, steps=STEPS) -> dict[int, list[int]]:
    """Per group, the numbers of channels the scan removes (one per candidate ratio)."""
    return {g.id: sorted({g.size - kept_count(g.size, r, round_to, g.blocks) for r in steps} - {0})
            for g in cg.prunable()}


def scan(model: Model, cg: ChannelGraph, scores: np.ndarray, calibration: Iterable[dict],
         round_to: int = 1, steps=STEPS, refits: Refits | None = None) -> dict[int, dict[float, float]]:
    """Relative output error of the model with each prunable group alone pruned at each ratio; with
    `refits` (from `obs.eliminate`), the consumers carry their re-fitted weights during the run."""
    batches = list(calibration)
    reference = [session(model).run(None, b) for b in batches]
    errors: dict[int, dict[float, float]] = {}
    from tqdm.auto import tqdm
    for group in tqdm(cg.prunable(), desc="sensitivity scan", unit="group", leave=False):
        errors[group.id] = {}
        for ratio in steps:
            plan = select(cg, scores, {group.id: ratio}, round_to)
            if not plan.any():
                continue
            refit = (refits or {}).get((group.id, int(plan.sum())), [])
            with _zeroed(model, cg, plan), _refitted(model, refit):
                sess = session(model)
                errors[group.id][ratio] = float(np.mean([_output_error(ref, sess.run(None, b))
                                                          for ref, b in zip(reference, batches)]))
    return errors


def _output_error(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """How far the outputs moved: KL(reference || actual) per row for outputs that are probability rows
    (a classifier's softmax, where squared error says little about the decision), else the relative
    squared error; summed over the outputs."""
    total = 0.0
    for r, a in zip(reference, actual):
        r, a = r.astype(np.float64), a.astype(np.float64)
        if r.ndim >= 1 and r.size and r.min() >= 0 and np.allclose(r.sum(axis=-1), 1, atol=1e-3):
            rows = r.reshape(-1, r.shape[-1]), np.maximum(a.reshape(-1, r.shape[-1]), 1e-12)
            total += float(np.mean(np.sum(rows[0] * (np.log(np.maximum(rows[0], 1e-12)) - np.log(rows[1])), axis=1)))
        else:
            total += float(np.sum((r - a) ** 2)) / max(float(np.sum(r ** 2)), 1e-30)
    return total


class _zeroed:
    """Context: the consumers' input columns of the planned channels are zero (plain constants only)."""

    def __init__(self, model: Model, cg: ChannelGraph, plan: np.ndarray):
        self.saved: list[tuple[gs.Constant, np.ndarray]] = []
        masks = keep_masks(cg, plan)
        self.edits = [(m, masks[m.space]) for m in cg.members if m.role == "in" and not masks[m.space].all()]

    def __enter__(self):
        for member, mask in self.edits:
            tensor = member.node.inputs[member.input_index]
            if not isinstance(tensor, gs.Constant):
                log.debug("sensitivity: %r is not a plain initializer; not zeroed", tensor.name)
                continue
            original = np.asarray(tensor.values)
            self.saved.append((tensor, original))
            zeroed = np.array(original)
            index = [slice(None)] * zeroed.ndim
            index[member.axis] = ~mask
            zeroed[tuple(index)] = 0
            tensor.values = zeroed
        return self

    def __exit__(self, *exc):
        for tensor, original in reversed(self.saved):
            tensor.values = original
        return False


class _refitted:
    """Context: the given consumers temporarily carry re-fitted weights."""

    def __init__(self, model: Model, refit: list[tuple[gs.Node, np.ndarray]]):
        self.model, self.refit = model, refit
        self.saved = [(node, list(node.inputs)) for node, _ in refit]

    def __enter__(self):
        for node, theta in self.refit:
            LAYERS[node.op].store(self.model, node, theta)
        return self

    def __exit__(self, *exc):
        for node, inputs in self.saved:
            while len(node.inputs) > len(inputs):
                node.inputs.pop()
            for i, tensor in enumerate(inputs):
                node.inputs[i] = tensor
        return False


def sensitivity_ratios(model: Model, cg: ChannelGraph, scores: np.ndarray, costs: CostModel, metric: str,
                       target: float, calibration: Iterable[dict], round_to: int = 1,
                       refits: Refits | None = None) -> dict[int, float]:
    """Per-group ratios meeting `target` (share of `metric` kept) with the least scanned error."""
    errors = scan(model, cg, scores, calibration, round_to, refits=refits)
    nothing = np.zeros(cg.total, dtype=bool)
    original = getattr(costs.cost(nothing), metric)
    ratios = {gid: 0.0 for gid in errors}

    def share(candidate: dict[int, float]) -> float:
        return getattr(costs.cost(select(cg, scores, candidate, round_to)), metric) / max(original, 1)

    current_share = 1.0
    while current_share > target:
        best, best_value = None, -1.0
        for gid, by_ratio in errors.items():
            now = ratios[gid]
            err_now = errors[gid].get(now, 0.0)
            for ratio, err in by_ratio.items():
                if ratio <= now:
                    continue
                trial = {**ratios, gid: ratio}
                saved = current_share - share(trial)
                if saved <= 0:
                    continue
                value = saved / (max(err - err_now, 0.0) + 1e-6)
                if value > best_value:
                    best, best_value = (gid, ratio), value
                break  # only the next step of each group
        if best is None:
            log.info("sensitivity: the scanned ratios cannot reach the target; raising all groups uniformly")
            return ratios_for_target(cg, scores, costs, metric, target, round_to, ratios)
        ratios[best[0]] = best[1]
        current_share = share(ratios)
    return ratios
