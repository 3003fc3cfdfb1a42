"""Weight rounding beyond round-to-nearest, and which weights are stored in 4 bits.

`insert-qdq(rounding=gptq)` rounds the weights of Conv (group 1), Gemm and MatMul against their input
statistics (see `gptq`; 4-bit ones with each output channel's step chosen by the output error after
GPTQ); `insert-qdq(int4-share=0.6)` stores the weights covering 60% of the weight parameters in 4 bits
(ONNX INT4 in [-8, 7], opset 21, two values per byte) and the rest in 8.

Which weights go to 4 bits is measured, not guessed: each candidate is rounded to 4 bits alone in the
float model and the output SQNR on calibration batches is taken. Its noise power (10^(-SQNR/10))
divided by the parameters it saves orders the candidates; the cheapest are taken until the share is
covered. Noise from several layers adds roughly, so this greedy order approximates the knapsack
"least added noise for the bytes saved". Depthwise kernels, with nine weights a channel, come last
by themselves.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model, activation_batches
from .gptq import gptq_quantize, gptq_with_scale_search
from .scales import (INT4_HALF_LEVELS, INT4_LOWEST, REDUCED_HALF_LEVELS, SYMMETRIC_HALF_LEVELS, dequantize,
                     quantize_weight)
from .sensitivity import OutputProbe
from .tables import is_lookup_table

#: ops whose constant weight may be stored in 4 bits
INT4_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")
#: first opset whose DequantizeLinear reads INT4
INT4_OPSET = 21
#: GPTQ needs this many calibration rows per weight input; with fewer its Gram matrix is rank-deficient
#: and the error feedback fits the calibration samples (MobileNetV2's classifier: 100 rows, 1280 inputs)
MIN_ROWS_PER_INPUT = 4


@dataclass
class StoredWeight:
    """A weight already rounded: what `insert.store_weight` writes instead of rounding it itself."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray


def round_weights(model: Model, weights: dict[str, int | None], bits: dict[str, int], reduce_range: bool,
                  batches: Iterable[dict] | None, limit: int | None, log: logging.Logger) -> dict[str, StoredWeight]:
    """Round each weight in `weights` (name -> channel axis) to its `bits` (default 8): by GPTQ where
    the weight is one factorable op's and `batches` are given, to nearest otherwise."""
    tensors = model.tensors()
    rounded = {name: _nearest(model, tensors[name], axis, bits.get(name, 8), reduce_range)
               for name, axis in weights.items()}
    if batches is None:
        return rounded
    sites = _gptq_sites(model, weights, tensors)
    if not sites:
        return rounded
    grams = _input_grams(model, sites, batches, limit)
    done = 0
    for name, site in sites.items():
        gram = grams[name]
        if gram.rows < MIN_ROWS_PER_INPUT * site.matrix.shape[0]:
            log.info("insert-qdq: %s rounded to nearest: %d calibration rows for %d inputs are too few for GPTQ",
                     name, gram.rows, site.matrix.shape[0])
            continue
        stored, scale = rounded[name], rounded[name].scale
        if bits.get(name, 8) == 4:   # 16 levels: the step is worth choosing in the output metric
            matrix_q, step = gptq_with_scale_search(site.matrix, gram.value, INT4_HALF_LEVELS, INT4_LOWEST,
                                                    INT4_HALF_LEVELS)
            scale = step.astype(np.float32).reshape(stored.scale.shape)
        else:
            half = REDUCED_HALF_LEVELS if reduce_range else SYMMETRIC_HALF_LEVELS
            matrix_q = gptq_quantize(site.matrix, gram.value, stored.scale, -half, half)
        rounded[name] = StoredWeight(_to_source(site, matrix_q).astype(stored.q.dtype), scale, stored.zero_point)
        done += 1
    log.info("insert-qdq: GPTQ rounded %d of %d weights", done, len(weights))
    return rounded


def _input_grams(model: Model, sites: dict, batches: Iterable[dict], limit: int | None) -> dict:
    """{weight: InputGram of its site's input rows} over at most `limit` calibration batches."""
    from ..lowrank.factorize import InputGram
    grams = {name: InputGram(site.matrix.shape[0]) for name, site in sites.items()}
    names = sorted({site.activation.name for site in sites.values()})
    chosen = itertools.islice(iter(batches), limit) if limit else batches
    for values in activation_batches(model, names, chosen, progress="insert-qdq: GPTQ input statistics"):
        for name, site in sites.items():
            grams[name].add(site.rows(np.asarray(values[site.activation.name])))
    return grams


def choose_int4(model: Model, weights: dict[str, int | None], share: float, batches: Iterable[dict],
                probe_batches: int, log: logging.Logger) -> dict[str, int]:
    """{weight: 4} for the cheapest-to-round weights covering `share` of the candidates' parameters."""
    from tqdm.auto import tqdm
    tensors = model.tensors()
    candidates = {name: axis for name, axis in weights.items() if _int4_candidate(tensors[name])}
    if share <= 0 or not candidates:
        return {}
    probe = OutputProbe(model, itertools.islice(iter(batches), probe_batches), probe_batches)
    cost = {}
    for name, axis in tqdm(candidates.items(), desc="int4 sensitivity", unit="weight", leave=False):
        stored = _nearest(model, tensors[name], axis, 4, False)
        variant = model.copy()
        variant.tensors()[name].values = dequantize(stored.q, stored.scale, stored.zero_point, axis)
        noise = 10 ** (-probe.sqnr(variant) / 10)
        cost[name] = noise / tensors[name].values.size
    total = sum(tensors[name].values.size for name in candidates)
    chosen, covered = {}, 0
    for name in sorted(cost, key=cost.get):
        if covered >= share * total:
            break
        chosen[name] = 4
        covered += tensors[name].values.size
    log.info("insert-qdq: %d of %d candidate weights (%.0f%% of their parameters) stored in 4 bits",
             len(chosen), len(candidates), 100 * covered / total)
    return chosen


def weight_only_inputs(model: Model, activations: list[str], nodes: list[str],
                       rounded: dict[str, StoredWeight]) -> set[str]:
    """Activations (of `activations`) that only feed quantized MatMuls with 4-bit weights: they stay
    float. onnxruntime runs float x int4 MatMul as one fused kernel (MatMulNBits, as fast as float
    here) but an int8-activation MatMul with 4-bit weights dequantizes the weights on every run; and
    weight-only 4 bits loses less than 4-bit weights times 8-bit activations."""
    tensors, quantized = model.tensors(), set(nodes)
    int4 = {name for name, stored in rounded.items() if np.dtype(stored.q.dtype).name == "int4"}
    chosen = set()
    for name in activations:
        readers = [c for c in tensors[name].outputs if c.name in quantized]
        if readers and all(c.op == "MatMul" and c.inputs[0] is tensors[name] and c.inputs[1].name in int4
                           for c in readers):
            chosen.add(name)
    return chosen


def _int4_candidate(tensor: gs.Tensor) -> bool:
    """A float weight read only by ops that take 4-bit weights (not a bias, not a shape); lookup tables
    need an even row length (their rows are stored as nibble pairs, see `tables`)."""
    consumers = list(tensor.outputs)
    if is_lookup_table(tensor):
        return tensor.shape[1] % 2 == 0
    return bool(consumers) and all(c.op in INT4_OPS and c.op != "Gather" and c.inputs.index(tensor) == 1
                                   for c in consumers)


def _nearest(model: Model, tensor: gs.Tensor, axis: int | None, bits: int, reduce_range: bool) -> StoredWeight:
    value = model.constant_value(tensor).astype(np.float32)
    if axis is not None and value.ndim == 0:
        axis = None
    return StoredWeight(*quantize_weight(value, axis, reduce_range, bits))


def _gptq_sites(model: Model, weights: dict[str, int | None], tensors) -> dict:
    """{weight: its lowrank Site} for weights read by exactly one factorable op whose input rows exist
    and whose per-channel axis is the site's output columns (what GPTQ's per-column scale needs)."""
    from ..lowrank.sites import find_site
    sites = {}
    for name, axis in weights.items():
        consumers = list(tensors[name].outputs)
        if len(consumers) != 1 or axis is None:
            continue
        site = find_site(model, consumers[0])
        if isinstance(site, str) or site.via or site.source is not tensors[name] or site.rows_reason():
            continue
        value = model.constant_value(tensors[name])
        if value.shape[axis] != site.matrix.shape[1] or not np.array_equal(_to_source(site, site.matrix), value):
            continue
        sites[name] = site
    return sites


def _to_source(site, matrix: np.ndarray) -> np.ndarray:
    """A [k, n] matrix in the site's row convention -> the layout of the weight initializer."""
    from ..lowrank.sites import ConvSite
    if isinstance(site, ConvSite):
        return matrix.T.reshape(site.source_shape)
    return matrix.T if site.transposed else matrix
