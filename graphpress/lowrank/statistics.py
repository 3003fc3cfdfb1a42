"""Input Gram matrices of weight groups, accumulated over calibration batches in bounded memory.

One onnxruntime session exposes every group's input activations (`ir.activation_batches`); each batch
is turned into rows (MatMul rows, Gemm rows, conv patches) and added to the group's k×k Gram matrix,
then dropped. Sites sharing a weight add into the same matrix.
"""

from __future__ import annotations

import itertools
from typing import Iterable

import numpy as np

from ..ir import Model, activation_batches
from .factorize import InputGram
from .groups import WeightGroup


def input_grams(model: Model, groups: list[WeightGroup], batches: Iterable[dict[str, np.ndarray]],
                limit: int | None = None) -> list[np.ndarray]:
    """The Gram matrix of each group's input rows over the calibration `batches` (at most `limit`)."""
    views = {site.rows_key: site for group in groups for site in group.sites}
    grams = {key: InputGram(site.matrix.shape[0]) for key, site in views.items()}
    names = sorted({site.activation.name for site in views.values()})
    chosen = itertools.islice(batches, limit) if limit else batches
    for values in activation_batches(model, names, chosen, progress="svd-split: input statistics"):
        for key, site in views.items():
            grams[key].add(site.rows(np.asarray(values[site.activation.name])))
    return [sum(grams[site.rows_key].value for site in group.sites) for group in groups]
