"""The pruning report: per group, channels, parameters and MACs before and after, the frozen groups with
their reason, and the reconstruction error of every re-fitted layer. Left in `ctx.reports["prune-channels"]`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .groups import ChannelGraph
from .plan import CostModel


@dataclass
class GroupReport:
    """One dependency group; MACs and params are those of the layers and parameters it touches."""

    name: str
    channels_before: int
    channels_after: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    tensors: list[str]
    frozen: str | None = None


@dataclass
class LayerFit:
    """Relative squared error of a re-fitted layer's output against the original, before and after."""

    layer: str
    error_before: float
    error_after: float


@dataclass
class PruneReport:
    groups: list[GroupReport] = field(default_factory=list)
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    reconstruction: list[LayerFit] = field(default_factory=list)

    @property
    def frozen(self) -> list[GroupReport]:
        return [g for g in self.groups if g.frozen]

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"MACs {self.macs_before:,} -> {self.macs_after:,} "
                 f"({self.macs_after / max(self.macs_before, 1):.1%}); params {self.params_before:,} -> "
                 f"{self.params_after:,} ({self.params_after / max(self.params_before, 1):.1%})"]
        for g in self.groups:
            status = f"frozen: {g.frozen}" if g.frozen else f"{g.channels_before} -> {g.channels_after} channels"
            lines.append(f"  {g.name}: {status}; MACs {g.macs_before:,} -> {g.macs_after:,}")
        for fit in self.reconstruction:
            lines.append(f"  refit {fit.layer}: rel. error {fit.error_before:.4f} -> {fit.error_after:.4f}")
        return "\n".join(lines)


def build_report(cg: ChannelGraph, costs: CostModel, plan: np.ndarray) -> PruneReport:
    """The report of `plan` on the analysed graph (costs are the estimates of `costs`)."""
    nothing = np.zeros(cg.total, dtype=bool)
    before, after = costs.breakdown(nothing), costs.breakdown(plan)
    total_before, total_after = costs.cost(nothing), costs.cost(plan)
    report = PruneReport(macs_before=total_before.macs, macs_after=total_after.macs,
                         params_before=total_before.params, params_after=total_after.params)
    for group in cg.groups:
        spaces = set(group.spaces)
        layers = [i for i, layer in enumerate(cg.layers) if {layer.out_space, layer.in_space} & spaces]
        params = [i for i, (_, cuts) in enumerate(costs.params) if {sid for _, sid in cuts} & spaces]
        report.groups.append(GroupReport(
            name=group.name, channels_before=group.size,
            channels_after=int(group.size - plan[group.classes].sum()),
            macs_before=int(sum(before.layers[i] for i in layers)),
            macs_after=int(sum(after.layers[i] for i in layers)),
            params_before=int(sum(before.params[i] for i in params)),
            params_after=int(sum(after.params[i] for i in params)),
            tensors=[cg.spaces[s].tensor.name for s in group.spaces], frozen=group.frozen))
    return report
