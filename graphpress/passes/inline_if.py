"""`inline-if`: an If whose condition is a constant always runs the same branch; run it inline.

Exporters leave such Ifs behind (a traced flag, a shape check that constant folding resolved). The If
hides its branch from every other pass (folding, fusion, CSE work per graph); inlined, the branch's nodes
meet the rest of the graph. Run it around `fold`: `-p fold,inline-if,fold`.

It is not part of `fold`: some models lean on onnxruntime checking less than the spec asks inside a
branch (the ONNX AffineGrid function feeds Range a 1-element 1-D tensor where the spec wants a scalar;
onnxruntime's kernel accepts it, but its load-time check rejects the same value once inlining lets it be
folded to an initializer). `fold` must keep every model onnxruntime runs running.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..ir import Model
from .base import Pass, PassContext, PassResult
from .nodes import NamePool, output_ids, rewire, tidy
from ..ir.model import in_default_domain
from .registry import register


@register("inline-if")
class InlineIf(Pass):
    """Replace an If whose condition is a constant by the nodes of the branch it always takes."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        inlined = 0
        for graph in model.graphs():
            for node in list(graph.nodes):
                if node.op != "If" or not in_default_domain(node):
                    continue
                with ctx.at(node):
                    branch = taken_branch(node)
                    if branch is None:
                        continue
                    _inline(model, graph, node, branch)
                    inlined += 1
        if inlined:
            tidy(model)
        return PassResult(changed=inlined > 0, stats={"inlined": inlined})


def taken_branch(node: gs.Node) -> gs.Graph | None:
    """The branch an If always takes, or None when its condition is not a one-element constant."""
    condition = Model.constant_value(node.inputs[0])
    if condition is None or condition.size != 1:
        return None
    branch = node.attrs.get("then_branch" if bool(condition.reshape(-1)[0]) else "else_branch")
    if not isinstance(branch, gs.Graph) or len(branch.outputs) != len(node.outputs):
        return None
    return branch


def _inline(model: Model, graph: gs.Graph, node: gs.Node, branch: gs.Graph) -> None:
    """Move the branch's nodes into `graph` and make the If's readers read the branch's outputs.

    Sibling scopes may reuse names (both branches of one If, or branches of two Ifs), so a moved tensor
    whose name is already used in the model is renamed."""
    results = list(branch.outputs)
    graph.nodes.remove(node)  # first: once the If is gone, its branch is no longer a graph of the model
    names = NamePool(model)
    for tensor in _local_tensors(branch):
        if tensor.name in names.taken:
            tensor.name = names.fresh(tensor.name)
        names.taken.add(tensor.name)
    graph.nodes.extend(branch.nodes)
    branch.nodes = []  # the nodes live in `graph` now (a nested If must not be found in both)
    every_output = output_ids(model)
    for mine, theirs in zip(list(node.outputs), results):
        rewire(model, mine, theirs, every_output)
    node.inputs.clear()
    node.outputs.clear()


def _local_tensors(branch: gs.Graph) -> list[gs.Tensor]:
    """Tensors the branch defines: its nodes' outputs and the constants its nodes read."""
    found: dict[int, gs.Tensor] = {}
    for node in branch.nodes:
        for tensor in node.outputs:
            if tensor.name:
                found[id(tensor)] = tensor
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                found[id(tensor)] = tensor
    return list(found.values())
