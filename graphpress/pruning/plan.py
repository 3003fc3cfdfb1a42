"""Which channels to remove: per-group counts from ratios, the least important channels, and the cost
(MACs, parameters) of a plan before it is applied.

A plan is a boolean array over channel ids (True = remove). Counts respect `round_to` (the kept channels
of a group are a multiple of it, for hardware-friendly shapes) and the equal-blocks constraint of grouped
convolutions; a group always keeps at least one channel (or one per block).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..ir import Model
from ..ir.cost import node_macs
from .groups import ChannelGraph, Group
from .weights import weight_shape

log = logging.getLogger("graphpress.pruning")


def kept_count(size: int, ratio: float, round_to: int = 1, blocks: int = 1) -> int:
    """How many of `size` channels to keep when removing `ratio` of them."""
    step = max(1, round_to) * blocks // math.gcd(max(1, round_to), blocks)
    keep = size - int(math.floor(size * ratio + 1e-9))
    keep = int(math.ceil(keep / step) * step)
    if keep >= size or size <= step:
        return size
    return max(step, keep)


def select(cg: ChannelGraph, scores: np.ndarray, ratios: dict[int, float], round_to: int = 1) -> np.ndarray:
    """The plan removing, in each group with a ratio, its least important channels (ties: lowest id)."""
    plan = np.zeros(cg.total, dtype=bool)
    for group in cg.prunable():
        ratio = ratios.get(group.id, 0.0)
        if ratio <= 0:
            continue
        keep = kept_count(group.size, ratio, round_to, group.blocks)
        if keep < group.size:
            plan[_least_important(cg, group, scores, group.size - keep)] = True
    return plan


def _least_important(cg: ChannelGraph, group: Group, scores: np.ndarray, count: int) -> np.ndarray:
    if group.blocks <= 1:
        order = np.lexsort((group.classes, scores[group.classes]))
        return group.classes[order[:count]]
    space = cg.spaces[group.block_space]
    per_block = space.size // group.blocks
    channel_of = cg.channel_of[space.start:space.start + space.size]
    chosen = []
    for b in range(group.blocks):
        block = np.intersect1d(channel_of[b * per_block:(b + 1) * per_block], group.classes)
        order = np.lexsort((block, scores[block]))
        chosen.append(block[order[:count // group.blocks]])
    return np.concatenate(chosen)


def keep_masks(cg: ChannelGraph, plan: np.ndarray) -> list[np.ndarray]:
    """For every space, a boolean mask of the positions that stay."""
    keep = ~plan[cg.channel_of]
    return [keep[s.start:s.start + s.size] for s in cg.spaces]


@dataclass
class Cost:
    macs: int
    params: int


class CostModel:
    """MACs and parameter counts of the model under a plan, without applying it.

    Each layer's MACs scale with the kept share of its output and input channel spaces; each parameter
    shrinks along every axis a member slices.
    """

    def __init__(self, model: Model, cg: ChannelGraph, shapes: dict[str, tuple], total_params: int,
                 total_macs: int):
        self.cg = cg
        self.layer_macs = [node_macs(layer.node, shapes) for layer in cg.layers]
        self.other_macs = total_macs - sum(self.layer_macs)
        params: dict[tuple[int, int], tuple[tuple, list]] = {}
        for m in cg.members:
            key = (id(m.node), m.input_index)
            shape = weight_shape(model, m.node.inputs[m.input_index])
            entry = params.setdefault(key, (shape, []))
            entry[1].append((m.axis, m.space))
        self.params = list(params.values())
        self.other_params = total_params - sum(int(np.prod(shape)) for shape, _ in self.params)

    def breakdown(self, plan: np.ndarray) -> "Breakdown":
        """MACs of every layer (as `cg.layers`) and size of every sliced parameter (as `self.params`)."""
        fractions = [mask.mean() if mask.size else 1.0 for mask in keep_masks(self.cg, plan)]
        layers = []
        for layer, value in zip(self.cg.layers, self.layer_macs):
            f_out = fractions[layer.out_space] if layer.out_space is not None else 1.0
            f_in = fractions[layer.in_space] if layer.in_space is not None else 1.0
            layers.append(value * f_out * f_in)
        params = []
        for shape, cuts in self.params:
            size = float(np.prod(shape))
            for sid in {axis: sid for axis, sid in cuts}.values():
                size *= fractions[sid]
            params.append(size)
        return Breakdown(layers, params)

    def cost(self, plan: np.ndarray) -> Cost:
        parts = self.breakdown(plan)
        return Cost(int(round(self.other_macs + sum(parts.layers))), int(round(self.other_params + sum(parts.params))))


@dataclass
class Breakdown:
    layers: list[float]
    params: list[float]


def uniform_ratios(cg: ChannelGraph, ratio: float) -> dict[int, float]:
    return {g.id: ratio for g in cg.prunable()}


def ratios_for_target(cg: ChannelGraph, scores: np.ndarray, costs: CostModel, metric: str, target: float,
                      round_to: int = 1, base: dict[int, float] | None = None) -> dict[int, float]:
    """Per-group ratios (at least the `base` ones) whose plan keeps at most `target` of the model's MACs
    or params, as close to uniform as the channel counts allow.

    Single channels: the smallest uniform ratio that meets the target (bisection on the estimated cost).
    With `round_to` (or grouped convolutions) kept counts move in steps, and one uniform ratio moves many
    groups a whole step at once (a 16-channel group jumps from 16 to 8 kept), far past the target; there,
    steps are taken one at a time, each from the group that will then have lost the smallest share of its
    channels, until the target is met.
    """
    base = base or {}
    original = getattr(costs.cost(np.zeros(cg.total, dtype=bool)), metric)

    def ratios(r: float) -> dict[int, float]:
        return {g.id: max(r, base.get(g.id, 0.0)) for g in cg.prunable()}

    def share(candidate: dict[int, float]) -> float:
        return getattr(costs.cost(select(cg, scores, candidate, round_to)), metric) / max(original, 1)

    if any(_step(g, round_to) > 1 for g in cg.prunable()):
        current = ratios(0.0)
        while share(current) > target:
            steps = [(g, _one_step_more(g, current[g.id], round_to)) for g in cg.prunable()]
            steps = [(g, r) for g, r in steps if r is not None]
            if not steps:
                break
            group, ratio = min(steps, key=lambda step: (step[1], step[0].id))
            if share({**current, group.id: ratio}) <= target:
                # the last step: of the steps that meet the target, the one that removes the least
                group, ratio = max(steps, key=lambda step: _meets(share({**current, step[0].id: step[1]}), target))
            current[group.id] = ratio
        return current
    lo, hi = 0.0, 0.99
    if share(ratios(hi)) > target:
        return ratios(hi)
    for _ in range(30):
        mid = (lo + hi) / 2
        if share(ratios(mid)) > target:
            lo = mid
        else:
            hi = mid
    return ratios(hi)


def ratios_by_error(cg: ChannelGraph, scores: np.ndarray, costs: CostModel, metric: str, target: float,
                    curves: dict[int, np.ndarray], round_to: int = 1, base: dict[int, float] | None = None,
                    chunks: int = 16) -> dict[int, float]:
    """Per-group ratios (at least the `base` ones) meeting `target`, spending the error where it is cheapest.

    `curves[g][k]` is the error group g's consumers keep after their re-fit once its first k channels are
    gone (`obs.eliminate`). Starting from `base`, the group whose next step (about 1/`chunks` of its
    channels, a multiple of the round_to/block step) adds the least error per unit of MACs or params saved
    takes that step, until the estimated cost meets the target. Groups without a finite curve (no
    re-fittable consumer) are left alone.
    """
    base = base or {}
    original = getattr(costs.cost(np.zeros(cg.total, dtype=bool)), metric)

    def share(candidate: dict[int, float]) -> float:
        return getattr(costs.cost(select(cg, scores, candidate, round_to)), metric) / max(original, 1)

    current = {g.id: base.get(g.id, 0.0) for g in cg.prunable()}
    now = share(current)
    while now > target:
        best = None
        for group in cg.prunable():
            curve = curves.get(group.id)
            step = _step(group, round_to) * max(1, round(group.size / chunks / _step(group, round_to)))
            removed = group.size - kept_count(group.size, current[group.id], round_to, group.blocks)
            if curve is None or removed + step >= len(curve) or not np.isfinite(curve[removed + step]):
                continue
            trial = {**current, group.id: (removed + step) / group.size}
            after = share(trial)
            if after >= now:
                continue
            price = (curve[removed + step] - curve[removed]) / (now - after)
            if best is None or price < best[0]:
                best = (price, trial, after)
        if best is None:
            log.info("prune-channels: the error curves cannot reach the target; the rest is uniform")
            return ratios_for_target(cg, scores, costs, metric, target, round_to, current)
        _, current, now = best
    return current


def _meets(share: float, target: float) -> float:
    """Order of the final steps: those meeting the target by the share they keep, before all others."""
    return share if share <= target else -share


def _step(group: Group, round_to: int) -> int:
    """Channels a group's kept count moves by (round_to, and equal blocks of a grouped Conv)."""
    return max(1, round_to) * group.blocks // math.gcd(max(1, round_to), group.blocks)


def _one_step_more(group: Group, ratio: float, round_to: int) -> float | None:
    """The ratio removing one more step of channels from `group` than `ratio` does (None: no step left)."""
    step = _step(group, round_to)
    kept = kept_count(group.size, ratio, round_to, group.blocks)
    if kept - step < step:
        return None
    return (group.size - (kept - step)) / group.size
