"""The search over pass options under an accuracy budget, and the Pareto front of what it tried.

Each stage has a knob whose settings run from mild to aggressive (a pruning ratio, an SVD energy, how
much stays float in quantization). The metric is assumed to fall as a knob gets more aggressive, so a
binary search finds the most aggressive setting whose metric stays within the budget in log2(n) trials.
Every trial is kept: the Pareto front over (size, metric) is reported beside the chosen model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass(frozen=True)
class Knob:
    """A compression stage and its candidate pipelines, ordered from mild to aggressive.

    `budget_share` is the share of the accuracy budget the model may have spent once this stage is done
    (cumulative): an early stage that took the whole budget would leave quantization, which shrinks the
    model the most for the least accuracy, nothing to work with.
    """

    stage: str
    settings: tuple[str, ...]
    budget_share: float = 1.0


@dataclass
class Trial:
    """One evaluated candidate: the pipeline so far, its size and its metric."""

    stage: str
    pipeline: str
    size_bytes: int
    metric: float
    accepted: bool = False


@dataclass
class SearchLog:
    trials: list[Trial] = field(default_factory=list)

    def pareto_front(self) -> list[Trial]:
        """Trials not beaten by another that is no larger and scores no lower (one strictly better)."""
        front = []
        for t in self.trials:
            dominated = any(o.size_bytes <= t.size_bytes and o.metric >= t.metric
                            and (o.size_bytes < t.size_bytes or o.metric > t.metric) for o in self.trials)
            if not dominated:
                front.append(t)
        return sorted(front, key=lambda t: t.size_bytes)


def most_aggressive_within(settings: Sequence[str], score: Callable[[str], float], floor: float) -> str | None:
    """The last setting (in mild→aggressive order) whose score is ≥ floor, by binary search; None if none."""
    lo, hi, best = 0, len(settings) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if score(settings[mid]) >= floor:
            best, lo = settings[mid], mid + 1
        else:
            hi = mid - 1
    return best
