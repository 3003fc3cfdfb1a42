"""Pattern rewrites declared as small rules: a chain pattern, a check that says why it fails, a replacement.

    CONV_BN = Rule(
        name="conv-bn",
        ops=("Conv", "BatchNormalization"),          # Conv feeding a BatchNormalization
        check=lambda model, nodes: None if ... else "BN epsilon is not a constant",
        rewrite=lambda model, nodes: ([new_conv], new_conv.outputs[0]),
    )
    counts = apply_rules(model, [CONV_BN], ctx)

A chain matches when each node's first output feeds the next node (as its input `links[i]`, default
any input) and is consumed by nothing else and is not a graph output, so the intermediate values can
disappear. `rewrite` returns the new nodes and the tensor that replaces the last node's output; the
helper wires it in, drops the matched nodes and signs every new node with the rule's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import onnx_graphsurgeon as gs

from ..ir import Model, replace_uses
from ..ir.model import in_default_domain
from .base import PassContext

Check = Callable[[Model, list[gs.Node]], "str | None"]
Rewrite = Callable[[Model, list[gs.Node]], "tuple[list[gs.Node], gs.Tensor]"]


@dataclass(frozen=True)
class Rule:
    """A chain of op types to match, a check (None = applies, else the reason) and a rewrite."""

    name: str
    ops: tuple[str, ...]
    check: Check
    rewrite: Rewrite


def match_chain(model: Model, start: gs.Node, ops: Sequence[str]) -> tuple[list[gs.Node] | None, str]:
    """Follow single-consumer edges from `start` through `ops`; returns (nodes, "") or (None, why)."""
    if start.op != ops[0] or not in_default_domain(start):
        return None, f"is {start.op}, not {ops[0]}"
    chain = [start]
    for op in ops[1:]:
        last = chain[-1]
        if not last.outputs:
            return None, f"{last.op} has no outputs"
        out = last.outputs[0]
        if model.is_graph_output(out):
            return None, f"{last.op} output {out.name!r} is a graph output"
        if len(out.outputs) != 1:
            return None, f"{last.op} output {out.name!r} has {len(out.outputs)} consumers"
        nxt = out.outputs[0]
        if nxt.op != op or not in_default_domain(nxt):
            return None, f"{last.op} feeds {nxt.op}, not {op}"
        chain.append(nxt)
    return chain, ""


def apply_rules(model: Model, rules: Sequence[Rule], ctx: PassContext) -> dict[str, int]:
    """Apply each rule wherever it matches in the main graph; returns how often each fired."""
    counts = {rule.name: 0 for rule in rules}
    for rule in rules:
        for node in list(model.graph.nodes):
            if node.op != rule.ops[0] or not node.outputs:
                continue
            with ctx.at(node):
                chain, why = match_chain(model, node, rule.ops)
                if chain is None:
                    continue
                reason = rule.check(model, chain)
                if reason:
                    ctx.log.debug("rule %s: skip %s %r: %s", rule.name, node.op, node.name, reason)
                    continue
                new_nodes, replacement = rule.rewrite(model, chain)
                for new in new_nodes:
                    if not new.name:
                        new.name = model.unique_name(f"{rule.name}/{chain[-1].name or chain[-1].op}")
                    model.mark_made_by(new, rule.name)
                model.graph.nodes.extend(new_nodes)
                replace_uses(model, chain[-1].outputs[0], replacement)
                for old in chain:
                    old.inputs.clear()
                    old.outputs.clear()
                counts[rule.name] += 1
    if any(counts.values()):
        model.cleanup()
    return counts
