"""`fold-constants`: compute ahead of time what does not depend on the model's inputs.

Constant nodes become initializers; every node whose inputs are all constants is evaluated (all of them
in one onnxruntime session per graph) and replaced by its value, unless that value would make the model
balloon (a small constant broadcast to a large one that is not a layer's weight).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import GraphpressError
from ..ir import Model
from .base import Pass, PassContext, PassResult
from .nodes import has_subgraph, is_deterministic, replace_with_constant, tidy
from ..ir.model import in_default_domain
from .registry import register
from ..ir.standalone import evaluate

#: (op, input index) slots that hold a layer's parameters. A folded value read only there IS a weight
#: (e.g. made by ConstantOfShape in a weightless export), so the size limit does not stop it.
WEIGHT_INPUTS = {
    "Conv": {1, 2}, "ConvTranspose": {1, 2}, "ConvInteger": {1}, "QLinearConv": {3}, "Gemm": {0, 1, 2},
    "MatMul": {0, 1}, "MatMulInteger": {0, 1}, "BatchNormalization": {1, 2, 3, 4},
    "InstanceNormalization": {1, 2}, "LayerNormalization": {1, 2}, "GroupNormalization": {1, 2},
    "Gather": {0}, "LSTM": {1, 2, 3}, "GRU": {1, 2, 3}, "RNN": {1, 2, 3}, "PRelu": {1},
    "DequantizeLinear": {0},
}

MIB = 1 << 20


@register("fold-constants")
class FoldConstants(Pass):
    """Replace nodes whose inputs are all constants by their values (computed with onnxruntime).

    Random ops and ops outside the default domain are never folded. A value bigger than `max_growth`
    times the largest input it was computed from, and bigger than `size_floor_kb`, is not materialized
    (the model would balloon) unless every consumer reads it as a layer weight.
    """

    max_growth: float = 4.0        # keep a node whose output is this many times its largest input (not a weight)
    size_floor_kb: int = 1024      # outputs up to this size (KiB) are always folded
    constant_nodes: bool = True    # turn Constant nodes into initializers

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        for graph in model.graphs():
            outputs = {id(t) for t in graph.outputs}
            if self.constant_nodes:
                stats["constant_nodes"] += _constant_nodes_to_initializers(graph, outputs, ctx)
            stats += self._fold_graph(model, graph, outputs, ctx)
        if stats["folded"] or stats["constant_nodes"]:
            tidy(model)
        return PassResult(changed=bool(stats["folded"] or stats["constant_nodes"]), stats=dict(stats))

    def _fold_graph(self, model: Model, graph: gs.Graph, graph_outputs: set[int], ctx: PassContext) -> Counter:
        candidates = _foldable_nodes(graph, ctx)
        if not candidates:
            return Counter()
        values = _evaluate_or_split(model, candidates, ctx)
        folded = {id(n) for n in candidates
                  if all(not t.name or t.name in values for t in n.outputs)
                  and not any(id(t) in graph_outputs for t in n.outputs)}
        kept = self._unfold_oversized(candidates, folded, values, ctx)
        for node in candidates:
            if id(node) not in folded:
                continue
            for tensor in list(node.outputs):
                if tensor.name and tensor.outputs:
                    replace_with_constant(tensor, values[tensor.name])
            node.inputs.clear()
            node.outputs.clear()
        return Counter(folded=len(folded), kept_oversized=kept)

    def _unfold_oversized(self, candidates: list[gs.Node], folded: set[int], values: dict[str, np.ndarray],
                          ctx: PassContext) -> int:
        """Remove from `folded` the producers of values that would balloon the model, then the
        producers of whatever those nodes now need as materialized inputs, and so on."""
        kept = 0
        for node in reversed(candidates):
            if id(node) not in folded:
                continue
            for tensor in node.outputs:
                if tensor.name and self._balloons(tensor, values, folded):
                    ctx.log.debug("fold-constants: keep %s %r: its %.1f MiB output %r would balloon the model",
                                  node.op, node.name, values[tensor.name].nbytes / MIB, tensor.name)
                    folded.discard(id(node))
                    kept += 1
                    break
        return kept

    def _balloons(self, tensor: gs.Tensor, values: dict[str, np.ndarray], folded: set[int]) -> bool:
        readers = [(c, i) for c in tensor.outputs if id(c) not in folded
                   for i, t in enumerate(c.inputs) if t is tensor]
        if not readers:
            return False  # only folded nodes read it: it never lands in the model
        size = values[tensor.name].nbytes
        if size <= self.size_floor_kb * 1024:
            return False
        if all(i in WEIGHT_INPUTS.get(c.op, ()) for c, i in readers):
            return False
        producer = tensor.inputs[0]
        largest_input = max((_nbytes(t, values) for t in producer.inputs), default=0)
        return size > self.max_growth * largest_input


def _nbytes(tensor: gs.Tensor, values: dict[str, np.ndarray]) -> int:
    if isinstance(tensor, gs.Constant):
        try:
            itemsize = np.dtype(tensor.dtype).itemsize
        except TypeError:  # a type numpy has no dtype for (bfloat16 & co.): count a byte per element
            itemsize = 1
        return int(np.prod(tensor.shape)) * itemsize if tensor.shape is not None else 0
    value = values.get(tensor.name)
    return value.nbytes if value is not None else 0


def _constant_nodes_to_initializers(graph: gs.Graph, graph_outputs: set[int], ctx: PassContext) -> int:
    converted = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or not in_default_domain(node) or len(node.outputs) != 1:
            continue
        tensor = node.outputs[0]
        value = Model.constant_value(tensor)
        if value is None or id(tensor) in graph_outputs or not _storable(value):
            ctx.log.debug("fold-constants: keep Constant %r (graph output, sparse or string value)", node.name)
            continue
        replace_with_constant(tensor, value)
        node.inputs.clear()
        node.outputs.clear()
        converted += 1
    return converted


def _storable(value: np.ndarray) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in "biuf" and value.dtype.itemsize > 0


def _foldable_nodes(graph: gs.Graph, ctx: PassContext) -> list[gs.Node]:
    """Nodes, in topological order, whose every input is a constant or the output of an earlier one."""
    computed: set[int] = set()
    candidates = []
    for node in graph.nodes:
        if node.op == "Constant" or not node.outputs:
            continue
        if not all(isinstance(t, gs.Constant) or not t.name or id(t) in computed for t in node.inputs):
            continue
        why_not = _never_folded(node)
        if why_not:
            ctx.log.debug("fold-constants: keep %s %r: %s", node.op, node.name, why_not)
            continue
        candidates.append(node)
        computed.update(id(t) for t in node.outputs)
    return candidates


def _never_folded(node: gs.Node) -> str:
    """Why a node with constant inputs must still not be folded, or ''."""
    if not in_default_domain(node):
        return f"op of domain {node.domain!r}"
    if not is_deterministic(node):
        return "its outputs are random"
    if has_subgraph(node):
        return "it runs a subgraph"
    return ""


def _evaluate_or_split(model: Model, nodes: list[gs.Node], ctx: PassContext) -> dict[str, np.ndarray]:
    """Values of the nodes' outputs: all in one session, or node by node if that session fails
    (a node onnxruntime cannot run is then left alone, with its dependents)."""
    try:
        values = evaluate(model, nodes)
    except GraphpressError as exc:
        ctx.log.debug("fold-constants: evaluating %d nodes at once failed (%s); trying one by one",
                      len(nodes), exc)
        values = _evaluate_each(model, nodes, ctx)
    return {name: v for name, v in values.items() if _storable(v)}


def _evaluate_each(model: Model, nodes: list[gs.Node], ctx: PassContext) -> dict[str, np.ndarray]:
    values: dict[str, np.ndarray] = {}
    for node in nodes:
        if not all(isinstance(t, gs.Constant) or not t.name or t.name in values for t in node.inputs):
            continue
        try:
            values.update(evaluate(model, [node], known=values))
        except GraphpressError as exc:
            ctx.log.debug("fold-constants: cannot evaluate %s %r: %s", node.op, node.name, exc)
    return values
