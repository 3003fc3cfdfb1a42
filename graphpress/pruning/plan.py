"""Which channels to remove: per-group counts from ratios, the least important channels, and the cost
(MACs, parameters) of a plan before it is applied.

A plan is a boolean array over channel ids (True = remove). Counts respect `round_to` (the kept channels
of a group are a multiple of it, for hardware-friendly shapes) and the equal-blocks constraint of grouped
convolutions; a group always keeps at least one channel (or one per block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..ir import Model
from ..ir.cost import node_macs
from .groups import ChannelGraph, Group
from .weights import weight_shape


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
    """The smallest uniform ratio (added to `base` per-group ratios) whose plan keeps at most `target`
    of the model's MACs or params (bisection on the estimated cost)."""
    base = base or {}
    original = getattr(costs.cost(np.zeros(cg.total, dtype=bool)), metric)

    def ratios(r: float) -> dict[int, float]:
        return {g.id: max(r, base.get(g.id, 0.0)) for g in cg.prunable()}

    def share(r: float) -> float:
        return getattr(costs.cost(select(cg, scores, ratios(r), round_to)), metric) / max(original, 1)

    lo, hi = 0.0, 0.99
    if share(hi) > target:
        return ratios(hi)
    for _ in range(30):
        mid = (lo + hi) / 2
        if share(mid) > target:
            lo = mid
        else:
            hi = mid
    return ratios(hi)
