"""Input Gram matrices of weight groups, accumulated over calibration batches in bounded memory.

One onnxruntime session exposes every group's input activations (`ir.activation_batches`); each batch
is turned into rows (MatMul rows, Gemm rows, conv patches) and added to the group's k×k Gram matrix,
then dropped. Sites sharing a weight add into the same matrix. `paired_grams` runs the original and
the partly factored model side by side for sequential factorization (`factorize.refit_weight`).
"""

from __future__ import annotations

import itertools
from typing import Iterable

import numpy as np
import onnxruntime as ort

from ..ir import Model, activation_batches, session, with_outputs
from .factorize import InputGram, PairedGram
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


def reference_session(original: Model, groups: list[WeightGroup]) -> ort.InferenceSession:
    """One onnxruntime session of the original model exposing every group's input (for `paired_grams`)."""
    return session(with_outputs(original, sorted({s.activation.name for g in groups for s in g.sites})))


def paired_grams(reference: ort.InferenceSession, current: Model, groups: list[WeightGroup],
                 batches: Iterable[dict[str, np.ndarray]], limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(G', C) per group: the Gram of its input rows in `current`, and their cross product with the rows
    the same batches give in the original model (`reference_session`; input tensors keep their names)."""
    views = {site.rows_key: site for group in groups for site in group.sites}
    grams = {key: PairedGram(site.matrix.shape[0]) for key, site in views.items()}
    names = sorted({site.activation.name for site in views.values()})
    chosen = list(itertools.islice(batches, limit) if limit else batches)
    for batch, now in zip(chosen, activation_batches(current, names, chosen, progress="svd-split: sequential statistics")):
        before = dict(zip(names, reference.run(names, batch)))
        for key, site in views.items():
            name = site.activation.name
            grams[key].add_pair(site.rows(np.asarray(now[name])), site.rows(np.asarray(before[name])))
    return [(sum(grams[site.rows_key].value for site in group.sites),
             sum(grams[site.rows_key].cross for site in group.sites)) for group in groups]
