"""Low-rank factorization of a weight matrix, plain or whitened by its input statistics.

Every factorable op is seen here as `y = x @ W` with W of shape [k, n] and x a batch of rows of length
k (conv patches, the rows of a MatMul input, ...). Truncating the plain SVD of W minimises the weight
error ||W - A·B||. What matters is the output error ||x·W - x·A·B||, which is
||Lᵀ(W - A·B)|| for the Cholesky factor L of the input Gram matrix G = xᵀx = L·Lᵀ. Truncating the
SVD of Lᵀ·W and mapping back with L⁻ᵀ therefore gives the rank-r factors with the least output
error on the calibration data (the closed form of SVD-LLM; ASVD scales by activation magnitudes only).

Sequential factorization (SVD-LLM v2 / GPTQ style) feeds a layer the inputs x' of the already-factored
model but still aims at the original outputs x·W. With G' = x'ᵀx' + δI = L'·L'ᵀ and C = x'ᵀx,
||x'·M - x·W||² + δ||M - W||² = ||L'ᵀ(M - W*)||² + const for W* = W + (G')⁻¹(C - x'ᵀx')·W
(`refit_weight`: the least-squares weight, ridged toward W). Truncating the SVD of L'ᵀ·W* therefore gives
the rank-r factors that best reproduce the original layer's outputs from the inputs it will really see,
so each layer also corrects the error the layers before it left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import GraphpressError

#: damping is raised by this factor until the Gram matrix is positive definite
DAMPING_GROWTH = 10.0
DAMPING_TRIES = 8


class InputGram:
    """Accumulates G = Σ xᵀx over batches of input rows (float64, k×k memory whatever the data)."""

    def __init__(self, k: int):
        self.value = np.zeros((k, k), dtype=np.float64)
        self.rows = 0

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, self.value.shape[0])
        self.value += rows.T @ rows     # float32 within a batch, float64 across batches
        self.rows += rows.shape[0]


class PairedGram(InputGram):
    """Also accumulates C = Σ x'ᵀx between the rows x' a layer sees and the rows x of the original model."""

    def __init__(self, k: int):
        super().__init__(k)
        self.cross = np.zeros((k, k), dtype=np.float64)

    def add_pair(self, rows: np.ndarray, original: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, self.value.shape[0])
        original = np.asarray(original, dtype=np.float32).reshape(rows.shape)
        self.add(rows)
        self.cross += rows.T @ original


def refit_weight(weight: np.ndarray, whitening: np.ndarray, gram: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """W* = W + (L·Lᵀ)⁻¹(C - G)·W: the weight whose outputs on the rows x' best match x·W (module docstring).

    `whitening` is L from `whitening_factor(gram, ...)`, so its damping ridges W* toward W in directions
    the calibration rows do not span.
    """
    weight = np.asarray(weight, dtype=np.float64)
    step = scipy.linalg.solve_triangular(whitening, (cross - gram) @ weight, lower=True)
    return weight + scipy.linalg.solve_triangular(whitening.T, step, lower=False)


def whitening_factor(gram: np.ndarray, damping: float) -> np.ndarray:
    """Lower-triangular L with L·Lᵀ = G + δ·mean(diag G)·I; δ grows until the Cholesky succeeds."""
    scale = float(np.mean(np.diag(gram)))
    if not np.isfinite(scale) or scale <= 0.0:
        raise GraphpressError("the input Gram matrix is zero or not finite: the calibration inputs of this "
                              "layer are all zero or overflow")
    delta = damping
    for _ in range(DAMPING_TRIES):
        try:
            return np.linalg.cholesky(gram + delta * scale * np.eye(gram.shape[0]))
        except np.linalg.LinAlgError:
            delta = max(delta, 1e-8) * DAMPING_GROWTH
    raise GraphpressError(f"the input Gram matrix is not positive definite even with damping {delta:g}")


@dataclass
class Decomposition:
    """The SVD of W (or of Lᵀ·W when whitened), from which factors of any rank are cut."""

    u: np.ndarray               # [k, m]
    s: np.ndarray               # [m], descending: the spectrum rank selection looks at
    vt: np.ndarray              # [m, n]
    whitening: np.ndarray | None = None   # L, or None for the plain SVD

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """A [k, rank], B [rank, n] with A·B the best rank-`rank` approximation (in this metric).

        The singular values are split evenly (√s on each side) so both factors have similar ranges,
        which is what a later per-channel quantizer wants.
        """
        root = np.sqrt(self.s[:rank])
        first = self.u[:, :rank] * root
        if self.whitening is not None:
            first = scipy.linalg.solve_triangular(self.whitening.T, first, lower=False)
        return first, root[:, None] * self.vt[:rank]


def decompose(weight: np.ndarray, whitening: np.ndarray | None = None) -> Decomposition:
    """SVD of the [k, n] `weight`, or of Lᵀ·weight for a whitening factor L (see module docstring)."""
    matrix = np.asarray(weight, dtype=np.float64)
    if whitening is not None:
        matrix = whitening.T @ matrix
    return Decomposition(*thin_svd(matrix), whitening)


def thin_svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """u, s, vt of `matrix` from the eigendecomposition of its smaller Gram matrix.

    LAPACK's divide-and-conquer SVD is 5-10x slower than `eigh` here (and slower still when BLAS
    threads compete). The leading singular vectors come out as accurate, and because the other side
    is obtained by projecting the matrix itself (vt = uᵀ·M / s), u·diag(s)·vt reproduces M exactly
    at full rank even where tiny singular values are imprecise.
    """
    wide = matrix.shape[0] <= matrix.shape[1]
    gram = matrix @ matrix.T if wide else matrix.T @ matrix
    eigenvalues, vectors = np.linalg.eigh(gram)
    order = np.argsort(eigenvalues)[::-1]
    s = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
    vectors = vectors[:, order]
    safe = np.maximum(s, max(float(s[0]) if s.size else 0.0, 1e-300) * 1e-150)
    if wide:
        return vectors, s, (vectors.T @ matrix) / safe[:, None]
    return (matrix @ vectors) / safe, s, vectors.T
