"""Rank selection for low-rank splits: per layer by energy or ratio, or globally under a parameter budget.

A weight of k×n parameters split at rank r becomes two factors holding r·(k+n) parameters, so the
split only pays while r < k·n/(k+n); `max_useful_rank` applies that bound with a safety margin.

The global budget (`allocate_budget`) spreads a parameter budget over layers by their sensitivity:
each layer's cost of truncating to rank r is a curve over r, either the share of its (whitened, when
calibration data was used) spectral energy that is dropped, i.e. its relative output (or weight)
error, or the measured error of the model outputs (`lowrank.sensitivity`). A Lagrangian search
picks, for one price per parameter, the option that minimises cost + price·parameters in every layer
(an unsplit layer is one of the options), and bisects the price until the total fits the budget. That handles the jump at the break-even rank that a greedy
rank-by-rank search trips over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import GraphpressError


def max_useful_rank(k: int, n: int, margin: float = 0.0) -> int:
    """The largest rank r whose factors hold fewer than (1 - margin)·k·n parameters (0 if none)."""
    limit = (1.0 - margin) * k * n
    rank = math.ceil(limit / (k + n)) - 1
    return max(0, min(rank, k, n))


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """The smallest rank whose leading singular values hold `energy` of the sum of squares."""
    if not 0.0 < energy <= 1.0:
        raise GraphpressError(f"energy must be in (0, 1], got {energy}")
    squares = np.asarray(singular_values, dtype=np.float64) ** 2
    total = squares.sum()
    if total <= 0.0:
        return 1
    kept = np.cumsum(squares) / total
    # tolerate rounding: energy=1.0 must give the numerical rank, not fail on 0.9999999
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, squares.size))


def ratio_rank(k: int, n: int, ratio: float) -> int:
    """Rank as a fixed share of the largest possible rank min(k, n) (at least 1)."""
    if not 0.0 < ratio <= 1.0:
        raise GraphpressError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, math.ceil(ratio * min(k, n)))


def dropped_energy(singular_values: np.ndarray) -> np.ndarray:
    """dropped[r] = share of the squared spectrum lost when keeping the first r values (r = 0..len)."""
    squares = np.asarray(singular_values, dtype=np.float64) ** 2
    total = squares.sum()
    tail = np.concatenate([np.cumsum(squares[::-1])[::-1], [0.0]])
    return tail / total if total > 0 else np.zeros_like(tail)


@dataclass
class LayerCost:
    """What the budget search needs about one factorable weight."""

    params: int                 # parameters of the unsplit weight
    params_per_rank: int        # parameters each unit of rank costs (k + n)
    max_rank: int               # largest rank that still saves (see max_useful_rank)
    error: np.ndarray           # error[r]: what truncating to rank r costs (dropped_energy, or measured)

    def best(self, price: float) -> int | None:
        """The rank (None = leave unsplit) minimising error + price·parameters."""
        if self.max_rank < 1:
            return None
        ranks = np.arange(1, self.max_rank + 1)
        costs = self.error[ranks] + price * ranks * self.params_per_rank
        r = int(ranks[np.argmin(costs)])
        return r if costs[r - 1] < price * self.params else None

    def kept(self, rank: int | None) -> int:
        return self.params if rank is None else rank * self.params_per_rank


def allocate_budget(layers: list[LayerCost], budget: float, iterations: int = 100) -> list[int | None]:
    """Ranks (None = unsplit) so that the layers' parameters total at most `budget`, at least error.

    Raises GraphpressError if even the smallest ranks cannot meet the budget.
    """
    def choose(price: float) -> tuple[list[int | None], int]:
        ranks = [layer.best(price) for layer in layers]
        return ranks, sum(layer.kept(r) for layer, r in zip(layers, ranks))

    full = sum(layer.params for layer in layers)
    if full <= budget:
        return [None] * len(layers)
    tightest = sum(layer.kept(1 if layer.max_rank >= 1 else None) for layer in layers)
    if tightest > budget:
        raise GraphpressError(
            f"the parameter budget cannot be met: the factorable weights hold {full} parameters and still "
            f"{tightest} at rank 1, but the budget leaves them {int(budget)}")
    scale = max(float(np.max(layer.error)) for layer in layers) / min(layer.params_per_rank for layer in layers)
    low, high = 0.0, scale
    while choose(high)[1] > budget:
        high *= 2.0
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if choose(middle)[1] > budget:
            low = middle
        else:
            high = middle
    return choose(high)[0]
