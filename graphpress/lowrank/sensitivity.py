"""Measured sensitivity: how far the model's outputs move per unit of a layer's own truncation error.

The spectrum says how much of a layer's own output (or weight) a rank keeps, but not what that costs
downstream: an error in an attention value projection and the same relative error in a classifier
head move the model's outputs by very different amounts. `measured_gains` splits one weight group at
a time at a probe rank (half its break-even rank), runs the model on a few calibration batches, and
returns gain = (relative squared error of the model outputs) / (the layer's own dropped energy). The
budget search then weighs each layer's spectrum by its gain: a first-order model in which layer
errors add up at the outputs.
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


def measured_gains(model: Model, groups: list[WeightGroup], decompositions: list[Decomposition],
                   limits: list[int], batches: Iterable[dict[str, np.ndarray]], progress: bool = True) -> list[float]:
    """Output error per unit of own dropped energy, for every group (see the module docstring)."""
    batches = list(batches)
    reference = _outputs(model, batches)
    energy = sum(float(np.sum(y.astype(np.float64) ** 2)) for y in reference)
    gains: list[float] = []
    items = list(zip(groups, decompositions, limits))
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc="svd-split: sensitivity", unit="layer", leave=False)
    for group, decomposition, limit in items:
        probe = max(1, limit // 2)
        own = float(dropped_energy(decomposition.s)[min(probe, decomposition.s.size)])
        if limit < 1 or own <= 1e-12:
            gains.append(float("nan"))
            continue
        with trial_split(model, group, decomposition, probe):
            moved = _outputs(model, batches)
        error = sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(moved, reference))
        gains.append(error / max(energy, 1e-300) / own)
    known = [g for g in gains if np.isfinite(g)]
    fill = float(np.median(known)) if known else 1.0
    return [g if np.isfinite(g) else fill for g in gains]


def _outputs(model: Model, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    sess = session(model)
    return [y for batch in batches for y in sess.run(None, batch)]
