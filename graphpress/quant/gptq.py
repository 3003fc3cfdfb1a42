"""GPTQ: round a weight matrix onto its quantization grid so that the *output* error is smallest.

Rounding each weight to its nearest grid point (RTN) minimises the weight error. For a linear layer
y = x·W what matters is the output error ||X·(W - Ŵ)||², a quadratic form in the input Gram matrix
H = XᵀX. GPTQ (Frantar et al., 2023; Optimal Brain Quantization before it) quantizes the input rows
of W one at a time and spreads each row's rounding error over the rows not yet quantized, weighted
by the inverse Hessian, so that later rows compensate it. Rows are taken in order of decreasing
H diagonal ("act-order": the inputs with most energy are fixed first, while the most rows are left
to compensate). The work is done in blocks of rows with lazy updates, as in the paper.

Here W is [k, n] in the row convention y = x·W: rows are inputs (what H indexes), columns are
output channels (what a per-channel scale indexes).
"""

from __future__ import annotations

import numpy as np

from ..errors import GraphpressError

#: damping added to H's diagonal, as a share of its mean (the paper's 1%)
DAMPING = 0.01
#: rows quantized per block before the remaining rows are updated
BLOCK = 128


def gptq_quantize(weight: np.ndarray, gram: np.ndarray, scale: np.ndarray, qmin: int, qmax: int,
                  damping: float = DAMPING) -> np.ndarray:
    """Integers q [k, n] (float64 holding whole numbers) with q·scale ≈ weight in the output metric.

    `weight` is [k, n], `gram` the [k, k] input Gram matrix, `scale` the per-column step [n] (fixed
    beforehand, e.g. by `scales.clipped_ranges`); q is kept within [qmin, qmax].
    """
    w = np.array(weight, dtype=np.float64)
    k = w.shape[0]
    h = np.array(gram, dtype=np.float64)
    if h.shape != (k, k):
        raise GraphpressError(f"GPTQ: Gram matrix {h.shape} does not match a weight with {k} input rows")
    step = np.asarray(scale, dtype=np.float64).reshape(1, -1)
    dead = np.diag(h) <= 0          # inputs that are always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[order], h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damping * float(np.mean(np.diag(h)))
    inverse_root = _upper_cholesky_of_inverse(h)
    q = np.zeros_like(w)
    for start in range(0, k, BLOCK):
        stop = min(start + BLOCK, k)
        block = w[start:stop].copy()
        errors = np.zeros_like(block)
        local = inverse_root[start:stop, start:stop]
        for i in range(stop - start):
            rounded = np.clip(np.rint(block[i] / step[0]), qmin, qmax)
            q[start + i] = rounded
            error = (block[i] - rounded * step[0]) / local[i, i]
            block[i:] -= np.outer(local[i, i:], error)
            errors[i] = error
        w[stop:] -= inverse_root[start:stop, stop:].T @ errors
    restored = np.empty_like(q)
    restored[order] = q
    return restored


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """Upper-triangular U with Uᵀ·U = H⁻¹ (the rows GPTQ's error feedback reads)."""
    try:
        lower = np.linalg.cholesky(h)
    except np.linalg.LinAlgError as exc:
        raise GraphpressError("GPTQ: the input Gram matrix is not positive definite even with damping") from exc
    inverse = np.linalg.inv(lower)
    inverse = inverse.T @ inverse   # H⁻¹
    return np.linalg.cholesky(inverse).T


#: shares of a column's largest magnitude tried as its range by `gptq_with_scale_search`
SEARCH_SHARES = np.linspace(0.5, 1.0, 11)


def gptq_with_scale_search(weight: np.ndarray, gram: np.ndarray, levels: int, qmin: int, qmax: int,
                           shares: np.ndarray = SEARCH_SHARES, damping: float = DAMPING
                           ) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ with each column's step chosen in the output metric: (q [k, n], step [n]).

    For every share c in `shares` the step c·max|w| / `levels` is tried: GPTQ rounds all the candidate
    columns in one run (its error feedback never mixes columns, so each candidate is rounded as it would be
    alone), and each column keeps the step with the least output error (Δwᵀ·H·Δw). Clipping that lowers
    the weight error can still raise the output error, which is what the layer's next consumer sees.
    """
    w = np.asarray(weight, dtype=np.float64)
    n = w.shape[1]
    peak = np.abs(w).max(axis=0)
    peak = np.where(peak > 0, peak, 1.0)
    steps = np.concatenate([share * peak / levels for share in shares])
    tiled = np.tile(w, (1, len(shares)))
    q = gptq_quantize(tiled, gram, steps, qmin, qmax, damping)
    delta = q * steps - tiled
    errors = np.einsum("kn,kn->n", delta, np.asarray(gram, np.float64) @ delta).reshape(len(shares), n)
    chosen = np.argmin(errors, axis=0) * n + np.arange(n)
    return q[:, chosen], steps[chosen]
