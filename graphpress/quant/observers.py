"""Observers: turn the values a tensor takes on calibration data into the range [lo, hi] to quantize.

Two kinds, fed batch by batch (bounded memory, nothing but a running summary is kept):
- range observers (`MinMax`, `MovingAverageMinMax`) keep running extremes;
- `Histogram` keeps a fixed-size histogram over a range known in advance (the min/max of a first
  calibration pass), from which a *range selector* picks the clipping range:
  `percentile_range` (drop the rarest outliers), `entropy_range` (TensorRT's KL-divergence threshold)
  and `mse_range` (the range whose quantization error, rounding plus clipping, is smallest).

Clipping trades a larger error on rare outliers for a finer grid everywhere else; which trade is best
depends on the tensor, so the pass lets the user pick the observer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .scales import QRANGE, fake_quantize, scale_zero_point

#: histogram resolution: fine enough that a 256-level grid spans ~8 bins per level
HISTOGRAM_BINS = 2048


class MinMax:
    """The running minimum and maximum."""

    def __init__(self):
        self.lo, self.hi = np.inf, -np.inf

    def observe(self, x: np.ndarray) -> None:
        finite = x[np.isfinite(x)] if not np.isfinite(x).all() else x
        if finite.size:
            self.lo = min(self.lo, float(finite.min()))
            self.hi = max(self.hi, float(finite.max()))

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:  # never observed a finite value
            return 0.0, 0.0
        return self.lo, self.hi


class MovingAverageMinMax(MinMax):
    """An exponential moving average of each batch's min and max (less sensitive to one outlier batch)."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.seen = False

    def observe(self, x: np.ndarray) -> None:
        batch = MinMax()
        batch.observe(x)
        if batch.lo > batch.hi:
            return
        if not self.seen:
            self.lo, self.hi, self.seen = batch.lo, batch.hi, True
            return
        self.lo += self.momentum * (batch.lo - self.lo)
        self.hi += self.momentum * (batch.hi - self.hi)


@dataclass
class Histogram:
    """Counts of values over the fixed range [lo, hi] (values outside are counted in the end bins)."""

    lo: float
    hi: float
    bins: int = HISTOGRAM_BINS
    counts: np.ndarray = field(init=False)

    def __post_init__(self):
        if not self.hi > self.lo:
            self.hi = self.lo + 1e-8
        self.counts = np.zeros(self.bins, dtype=np.int64)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2

    def observe(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        x = x[np.isfinite(x)]
        index = ((x - self.lo) * (self.bins / (self.hi - self.lo))).astype(np.int64)
        self.counts += np.bincount(np.clip(index, 0, self.bins - 1), minlength=self.bins)

    def magnitudes(self) -> tuple[np.ndarray, np.ndarray]:
        """A histogram of |x| over [0, max(|lo|, |hi|)] with `bins` bins (counts, upper edges)."""
        limit = max(abs(self.lo), abs(self.hi))
        index = np.minimum((np.abs(self.centers) / limit * self.bins).astype(np.int64), self.bins - 1)
        counts = np.bincount(index, weights=self.counts, minlength=self.bins)
        return counts, np.linspace(0, limit, self.bins + 1)[1:]


def percentile_range(hist: Histogram, percentile: float) -> tuple[float, float]:
    """Clip (100 - percentile)% of the values off each tail (only the upper tail of a non-negative tensor)."""
    total = hist.counts.sum()
    if total == 0:
        return hist.lo, hist.hi
    tail = (100.0 - percentile) / 100.0 * total
    cdf = np.cumsum(hist.counts)
    edges = hist.edges
    hi = edges[min(int(np.searchsorted(cdf, total - tail, side="left")) + 1, hist.bins)]
    lo = edges[int(np.searchsorted(cdf, tail, side="right"))] if hist.lo < 0 else hist.lo
    return float(max(lo, hist.lo)), float(min(hi, hist.hi))


def entropy_range(hist: Histogram, levels: int = 128, stride: int = 8) -> tuple[float, float]:
    """TensorRT's calibration: the threshold T on |x| whose quantization into `levels` bins keeps the
    distribution closest in KL divergence; the range is [lo, hi] clipped to [-T, T]."""
    counts, upper = hist.magnitudes()
    # the spike of exact zeros (ReLU outputs, padding) would dominate the KL of every merged first group
    # and drive the threshold down to the smallest candidate; flatten it like pytorch-quantization does
    counts[0] = counts[1]
    best_kl, best = np.inf, len(counts)
    for end in range(levels, len(counts) + 1, stride):
        kl = _clipped_kl(counts, end, levels)
        if kl < best_kl:
            best_kl, best = kl, end
    threshold = upper[best - 1]
    hi = float(min(hist.hi, threshold))
    return float(min(max(hist.lo, -threshold), hi)), hi


def _clipped_kl(counts: np.ndarray, end: int, levels: int) -> float:
    """KL(P || Q) of clipping at bin `end`: P = counts[:end] with the clipped tail added to its last bin,
    Q = counts[:end] (without the tail) merged into `levels` equal groups and spread back uniformly
    over each group's non-empty bins. Clipping much mass makes P's last bin outgrow Q's."""
    inside = counts[:end].astype(np.float64)
    p = inside.copy()
    p[-1] += counts[end:].sum()
    nonzero = inside > 0
    groups = np.arange(end) * levels // end
    group_sum = np.bincount(groups, weights=inside, minlength=levels)
    group_nonzero = np.bincount(groups, weights=nonzero, minlength=levels)
    q = np.where(nonzero, group_sum[groups] / np.maximum(group_nonzero[groups], 1), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return np.inf
    p, q = p / p_sum, q / q_sum
    if (p[~nonzero] > 0).any():  # mass where Q has none: clipping here loses it entirely
        return np.inf
    p, q = p[nonzero], q[nonzero]
    return float(np.sum(p * np.log(p / q)))


def mse_range(hist: Histogram, qtype: str = "int8", symmetric: bool = False,
              candidates: int = 100) -> tuple[float, float]:
    """The range [a*lo, a*hi], a in (0, 1], whose fake quantization of the histogram has the least
    expected squared error (rounding inside the range plus clipping outside it)."""
    total = hist.counts.sum()
    if total == 0:
        return hist.lo, hist.hi
    centers, weights = hist.centers, hist.counts.astype(np.float64)
    used = weights > 0
    centers, weights = centers[used], weights[used]
    best_err, best = np.inf, (hist.lo, hist.hi)
    for a in np.linspace(1.0 / candidates, 1.0, candidates):
        lo, hi = a * hist.lo, a * hist.hi
        scale, zero_point = scale_zero_point(lo, hi, qtype, symmetric)
        err = float(np.sum(weights * (centers - fake_quantize(centers, scale, zero_point)) ** 2))
        if err < best_err:
            best_err, best = err, (float(lo), float(hi))
    return best


#: observers usable as `method=` and whether they need a histogram (a second calibration pass)
METHODS = ("minmax", "moving-average", "percentile", "entropy", "mse")
HISTOGRAM_METHODS = ("percentile", "entropy", "mse")


def select_range(method: str, hist: Histogram, qtype: str, symmetric: bool, percentile: float) -> tuple[float, float]:
    """Apply the histogram range selector named `method`."""
    if method == "percentile":
        return percentile_range(hist, percentile)
    if method == "entropy":
        # levels that cover [0, T]: all of them for a non-negative tensor on an asymmetric grid, else half
        levels = QRANGE[qtype][1] - QRANGE[qtype][0] + 1
        return entropy_range(hist, levels=levels if hist.lo >= 0 and not symmetric else levels // 2)
    if method == "mse":
        return mse_range(hist, qtype, symmetric)
    raise ValueError(f"{method!r} is not a histogram method ({', '.join(HISTOGRAM_METHODS)})")
