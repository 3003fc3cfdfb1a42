"""Weight rounding beyond round-to-nearest, and which weights are stored in 4 bits.

`insert-qdq(rounding=gptq)` rounds the weights of Conv (group 1), Gemm and MatMul against their input
statistics (see `gptq`; 4-bit ones with each output channel's step chosen by the output error after
GPTQ); `insert-qdq(int4-share=0.6)` stores the weights covering 60% of the weight parameters in 4 bits
(ONNX INT4 in [-8, 7], opset 21, two values per byte) and the rest in 8.

Which weights go to 4 bits is measured, not guessed: each candidate is rounded to 4 bits alone in the
float model, as it would be stored (by GPTQ with rounding=gptq), and the output SQNR on calibration
batches is taken. Its noise power (10^(-SQNR/10))
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
                  batches: Iterable[dict] | None, limit: int | None, log: logging.Logger,
                  grams: dict | None = None) -> dict[str, StoredWeight]:
    """Round each weight in `weights` (name -> channel axis) to its `bits` (default 8): by GPTQ where
    the weight is one factorable op's and `batches` are given, to nearest otherwise. `grams`: input
    statistics already gathered by `input_grams` for these weights (else gathered here)."""
    tensors = model.tensors()
    rounded = {name: _nearest(model, tensors[name], axis, bits.get(name, 8), reduce_range)
               for name, axis in weights.items()}
    if batches is None:
        return rounded
    sites = _gptq_sites(model, weights, tensors)
    if not sites:
        return rounded
    grams = grams if grams is not None else _input_grams(model, sites, batches, limit)
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


def input_grams(model: Model, weights: dict[str, int | None], batches: Iterable[dict], limit: int | None) -> dict:
    """{weight: InputGram} for the weights GPTQ can round (see `round_weights`), gathered in one pass."""
    return _input_grams(model, _gptq_sites(model, weights, model.tensors()), batches, limit)


def int4_candidates(model: Model, weights: dict[str, int | None]) -> dict[str, int | None]:
    """The weights (name -> channel axis) that may be stored in 4 bits."""
    tensors = model.tensors()
    return {name: axis for name, axis in weights.items() if _int4_candidate(tensors[name])}


def int4_costs(model: Model, rounded4: dict[str, StoredWeight], weights: dict[str, int | None],
               batches: Iterable[dict], probe_batches: int) -> dict[str, float]:
    """{weight: output noise power per parameter} with only that weight in its 4-bit rounding `rounded4`
    (the rounding the model will get: GPTQ's where it applies, whose order differs from round-to-nearest's:
    on MobileNetV2 it lets 90% of the weights go to 4 bits within a point of top-1 where the
    round-to-nearest order lost 2)."""
    from tqdm.auto import tqdm
    tensors = model.tensors()
    probe = OutputProbe(model, itertools.islice(iter(batches), probe_batches), probe_batches)
    cost = {}
    for name, stored in tqdm(rounded4.items(), desc="int4 sensitivity", unit="weight", leave=False):
        variant = model.copy()
        variant.tensors()[name].values = dequantize(stored.q, stored.scale, stored.zero_point, weights[name])
        cost[name] = 10 ** (-probe.sqnr(variant) / 10) / tensors[name].values.size
    return cost


def choose_int4(model: Model, cost: dict[str, float], share: float, log: logging.Logger) -> set[str]:
    """The cheapest weights by `cost` (see `int4_costs`) covering `share` of the candidates' parameters."""
    tensors = model.tensors()
    total = sum(tensors[name].values.size for name in cost)
    chosen, covered = set(), 0
    for name in sorted(cost, key=cost.get):
        if covered >= share * total:
            break
        chosen.add(name)
        covered += tensors[name].values.size
    log.info("insert-qdq: %d of %d candidate weights (%.0f%% of their parameters) stored in 4 bits",
             len(chosen), len(cost), 100 * covered / max(total, 1))
    return chosen


@dataclass
class _Analysis:
    """What `rounded_weights` computes once per model and calibration data, whatever the share."""

    rounded8: dict[str, StoredWeight]
    rounded4: dict[str, StoredWeight]
    cost: dict[str, float]


#: analyses kept for the process, newest last (each holds two roundings of the model's weights)
_ANALYSES: dict[str, _Analysis] = {}
CACHED_ANALYSES = 2


def rounded_weights(model: Model, weights: dict[str, int | None], share: float, reduce_range: bool,
                    batches: Iterable[dict], gptq: bool, gptq_limit: int | None, probe_batches: int,
                    log: logging.Logger) -> dict[str, StoredWeight]:
    """Every weight as insert-qdq(int4-share=`share`, rounding=gptq if `gptq` else nearest) stores it.

    The analysis behind it (every weight rounded in 8 bits, every candidate in 4, the candidates' costs)
    does not depend on the share: it is kept for the process, keyed by the content of the graph, the
    weights and the calibration data, so that a search over shares (`compress`) pays for it once.
    """
    key = _fingerprint(model, weights, batches, max(gptq_limit or 0, probe_batches),
                       (reduce_range, gptq, gptq_limit, probe_batches, share > 0))
    analysis = _ANALYSES.pop(key, None)
    if analysis is None:
        candidates = int4_candidates(model, weights) if share > 0 else {}
        source = batches if gptq else None
        grams = input_grams(model, weights, batches, gptq_limit) if gptq else None
        rounded8 = round_weights(model, weights, {}, reduce_range, source, gptq_limit, log, grams)
        rounded4 = round_weights(model, candidates, dict.fromkeys(candidates, 4), reduce_range, source, gptq_limit,
                                 log, grams) if candidates else {}
        cost = int4_costs(model, rounded4, weights, batches, probe_batches) if candidates else {}
        analysis = _Analysis(rounded8, rounded4, cost)
    _ANALYSES[key] = analysis
    while len(_ANALYSES) > CACHED_ANALYSES:
        _ANALYSES.pop(next(iter(_ANALYSES)))
    chosen = choose_int4(model, analysis.cost, share, log) if share > 0 else set()
    return {name: analysis.rounded4[name] if name in chosen else analysis.rounded8[name] for name in weights}


def _fingerprint(model: Model, weights: dict[str, int | None], batches: Iterable[dict], count: int,
                 settings: tuple) -> str:
    """A digest of the graph's structure, the weights' values and the first `count` calibration batches."""
    import hashlib
    digest = hashlib.sha256(repr(settings).encode())
    for node in model.graph.nodes:
        digest.update(repr((node.op, [t.name for t in node.inputs], [t.name for t in node.outputs],
                            sorted((k, repr(v)) for k, v in node.attrs.items()))).encode())
    tensors = model.tensors()
    for name, axis in weights.items():
        digest.update(repr((name, axis)).encode())
        digest.update(np.ascontiguousarray(model.constant_value(tensors[name])).tobytes())
    for batch in itertools.islice(iter(batches), count):
        for name in sorted(batch):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(batch[name]).tobytes())
    return digest.hexdigest()


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
