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
    """A compression stage and its candidate pipelines.

    `ordered` settings run from mild to aggressive and are binary-searched; unordered ones (recipes
    that trade size and accuracy differently) are all tried and the smallest within the floor wins.
    `budget_share` is the share of the accuracy budget the model may have spent once this stage is done
    (cumulative): an early stage that took the whole budget would leave quantization, which shrinks the
    model the most for the least accuracy, nothing to work with.
    A knob that `refines` an earlier stage does not add passes: its settings are pass options (written
    as a pass, e.g. `insert-qdq(int4-share=0.5)`) merged into that stage's chosen pipeline, which is
    re-run from the model that stage started from.
    """

    stage: str
    settings: tuple[str, ...]
    budget_share: float = 1.0
    ordered: bool = True
    refines: str = ""


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


def smallest_within(settings: Sequence[str], score: Callable[[str], float], size: Callable[[str], int],
                    floor: float) -> str | None:
    """The smallest setting (by `size`, after scoring) whose score is ≥ floor, the best score breaking
    ties; None if none is."""
    scores = {setting: score(setting) for setting in settings}
    passing = [setting for setting in settings if scores[setting] >= floor]
    return min(passing, key=lambda setting: (size(setting), -scores[setting])) if passing else None


def refined(pipeline: str, refinement: str) -> str:
    """`pipeline` with the options set in `refinement` (one pass in pipeline syntax) applied to the last
    pass of the same name: refined("fold,insert-qdq(method=mse)", "insert-qdq(int4-share=0.5)") is
    "fold,insert-qdq(method=mse,int4-share=0.5)"."""
    import dataclasses
    from ..errors import GraphpressError
    from ..passes.pipeline import format_pipeline, parse_pipeline
    (change,) = parse_pipeline(refinement)
    elements = parse_pipeline(pipeline)
    given = {spec.field: getattr(change, spec.field) for spec in change.options()
             if getattr(change, spec.field) != spec.default}
    for i in reversed(range(len(elements))):
        if getattr(elements[i], "name", None) == change.name:
            elements[i] = dataclasses.replace(elements[i], **given)
            return format_pipeline(elements)
    raise GraphpressError(f"cannot refine {pipeline!r}: it has no {change.name} pass")
