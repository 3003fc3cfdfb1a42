"""Sites that read the same weight are factored once: a `WeightGroup` is one weight and all its sites.

Factoring a weight only saves parameters if the original disappears, so a group is refused when the
weight has any other use (an op that is not factorable, a graph output, sites that read it in another
orientation).

`stages` orders groups for sequential factorization: each stage holds the groups whose inputs depend on
no group of a later stage (in a transformer layer: Q/K/V, then the attention output, then each FFN MatMul).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model, new_constant
from .factorize import Decomposition
from .sites import Site


@dataclass
class WeightGroup:
    """One constant weight and the sites that multiply by it (all with the same matrix W [k, n])."""

    sites: list[Site]

    @property
    def name(self) -> str:
        node = self.sites[0].node
        return node.name or f"{node.op} on {self.sites[0].source.name}"

    @property
    def matrix(self) -> np.ndarray:
        return self.sites[0].matrix

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    @property
    def params(self) -> int:
        return int(self.matrix.size)

    def split(self, model: Model, decomposition: Decomposition, rank: int) -> list[gs.Node]:
        """Rewrite every site into two thin ops; sites with the same layout share one pair of factor
        initializers. Returns the inserted nodes."""
        first, second = decomposition.factors(rank)
        dtype = self.matrix.dtype
        stored: dict[str, tuple[gs.Constant, gs.Constant]] = {}
        inserted = []
        for site in self.sites:
            if site.layout not in stored:
                a, b = site.stored(first, second)
                base = site.source.name
                stored[site.layout] = (new_constant(model, f"{base}_svd_a", a.astype(dtype)),
                                       new_constant(model, f"{base}_svd_b", b.astype(dtype)))
            inserted.append(site.rewrite(model, *stored[site.layout]))
        return inserted


    @property
    def settable(self) -> bool:
        """Whether `set_matrix` can replace the weight (an initializer, not a Constant node's output)."""
        return isinstance(self.sites[0].source, gs.Constant)

    def set_matrix(self, matrix: np.ndarray) -> None:
        """Replace the weight's value by `matrix` (in the row convention), stored in its own layout."""
        source = self.sites[0].source
        source.values = np.ascontiguousarray(self.sites[0].source_value(matrix), dtype=self.matrix.dtype)
        for site in self.sites:
            site.matrix = np.asarray(matrix, dtype=site.matrix.dtype)


def stages(model: Model, groups: list[WeightGroup]) -> list[list[int]]:
    """Group indices in dependency order: a group comes after every group that its input depends on."""
    owner = {id(site.node): i for i, group in enumerate(groups) for site in group.sites}
    upstream: dict[str, frozenset[int]] = {}
    model.graph.toposort()
    for node in model.graph.nodes:
        found = frozenset().union(*(upstream.get(t.name, frozenset()) for t in node.inputs))
        if id(node) in owner:
            found |= {owner[id(node)]}
        for tensor in node.outputs:
            upstream[tensor.name] = found
    needs = [frozenset().union(*(upstream.get(site.activation.name, frozenset()) for site in group.sites)) - {i}
             for i, group in enumerate(groups)]
    remaining, order = set(range(len(groups))), []
    while remaining:
        # a weight shared around a cycle (ALBERT-style reuse) has no clean order: take the earliest group
        ready = sorted(i for i in remaining if not needs[i] & remaining) or [min(remaining)]
        order.append(ready)
        remaining -= set(ready)
    return order


def group_sites(model: Model, sites: list[Site]) -> tuple[list[WeightGroup], dict[str, str]]:
    """Group sites by their weight; returns the groups and {group name: why it was refused}."""
    by_weight: dict[tuple[str, bool], list[Site]] = {}
    for site in sites:
        by_weight.setdefault((site.source.name, site.transposed), []).append(site)
    groups, refused = [], {}
    for members in by_weight.values():
        group = WeightGroup(members)
        why = _other_use(model, group)
        if why:
            refused[group.name] = why
        else:
            groups.append(group)
    return groups, refused


def _other_use(model: Model, group: WeightGroup) -> str:
    """Why the weight must stay although its sites are factored ('' when nothing else reads it)."""
    source = group.sites[0].source
    if model.is_graph_output(source):
        return f"weight {source.name!r} is a graph output"
    ours = {id(site.node) for site in group.sites}
    transposes = {id(node) for site in group.sites for node in site.via}
    for consumer in model.consumers(source):
        if id(consumer) in ours:
            continue
        if id(consumer) in transposes:
            others = [c for c in model.consumers(consumer.outputs[0]) if id(c) not in ours]
            if not others and not model.is_graph_output(consumer.outputs[0]):
                continue
            consumer = others[0] if others else consumer
        return f"weight {source.name!r} is also read by {consumer.op} {consumer.name!r}"
    return ""
