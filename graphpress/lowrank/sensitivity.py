"""Measured sensitivity: how far the model's outputs move when one layer is truncated, as a curve over rank.

The spectrum says how much of a layer's own output (or weight) a rank keeps, but not what that costs
downstream: an error in an attention value projection and the same relative error in a classifier
head move the model's outputs by very different amounts. `measured_costs` splits one weight group at
a time at a few probe ranks (evenly spread below its break-even rank), runs the model on a few
calibration batches, and measures the relative squared error of the model outputs at each. Between
probes the error follows the layer's own dropped energy: cost(r) = gain(r)·dropped(r), with the gain
(output error per unit of own dropped energy) interpolated linearly in r between the probes and held
constant beyond them. So the budget search sees each layer's measured error at the probed ranks and a
spectrum-shaped curve in between: a first-order model in which layer errors add up at the outputs.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import numpy as np

from ..ir import Model, session
from .factorize import Decomposition
from .groups import WeightGroup
from .rank import dropped_energy


@contextlib.contextmanager
def trial_split(model: Model, group: WeightGroup, decomposition: Decomposition, rank: int) -> Iterator[None]:
    """Split `group` at `rank` in place for the duration of the block, then restore the graph exactly."""
    saved = [(site.node, list(site.node.inputs), dict(site.node.attrs)) for site in group.sites]
    docs = dict(model.node_docs)
    inserted = group.split(model, decomposition, rank)
    try:
        yield
    finally:
        for node in inserted:
            node.inputs.clear()
            node.outputs.clear()
            model.graph.nodes.remove(node)
        for node, inputs, attrs in saved:
            node.inputs.clear()
            node.inputs.extend(inputs)
            node.attrs = attrs
        model.node_docs = docs


def measured_costs(model: Model, groups: list[WeightGroup], decompositions: list[Decomposition],
                   limits: list[int], batches: Iterable[dict[str, np.ndarray]], probes: int = 4,
                   progress: bool = True) -> list[np.ndarray]:
    """cost[r] (r = 0..len(s)) per group: measured relative output error, see the module docstring."""
    batches = list(batches)
    reference = _outputs(model, batches)
    energy = sum(float(np.sum(y.astype(np.float64) ** 2)) for y in reference)
    curves: list[np.ndarray] = []
    items = list(zip(groups, decompositions, limits))
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc="svd-split: sensitivity", unit="layer", leave=False)
    for group, decomposition, limit in items:
        dropped = dropped_energy(decomposition.s)
        ranks = sorted({max(1, round(limit * (j + 1) / (probes + 1))) for j in range(probes)}) if limit >= 1 else []
        measured, gains = [], []
        for rank in ranks:
            if dropped[rank] <= 1e-12:
                continue
            with trial_split(model, group, decomposition, rank):
                moved = _outputs(model, batches)
            error = sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(moved, reference))
            measured.append(rank)
            gains.append(error / max(energy, 1e-300) / dropped[rank])
        # no probe measurable: no split saves, or the truncations drop nothing (an exactly low-rank weight)
        curves.append(dropped * np.interp(np.arange(dropped.size), measured, gains) if measured else dropped)
    return curves


def _outputs(model: Model, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    sess = session(model)
    return [y for batch in batches for y in sess.run(None, batch)]
