"""What the folding, clean-up and fusion passes share about nodes and graph edits.

Facts (is a node deterministic, does it run a subgraph) and fast edits (a tensor becomes a constant,
readers move to another tensor, dead nodes go and the rest is sorted, fresh names) that stay linear in
the graph size: the passes run many times inside `fold`, so per-edit whole-model scans add up.
"""

from __future__ import annotations

import heapq

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model, replace_uses

#: ops whose output differs from run to run: never folded, never merged
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                        "Bernoulli", "Multinomial"})


def is_deterministic(node: gs.Node) -> bool:
    """False for ops with random outputs, and for Dropout unless it is provably in inference mode."""
    if node.op in RANDOM_OPS:
        return False
    if node.op == "Dropout":
        return dropout_is_inference(node)
    return True


def dropout_is_inference(node: gs.Node) -> bool:
    """A Dropout is the identity when its training_mode input is absent or a constant false."""
    if node.attrs.get("is_test", 1) == 0:
        return False
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return True
    value = Model.constant_value(node.inputs[2])
    return value is not None and not bool(np.asarray(value).any())


def has_subgraph(node: gs.Node) -> bool:
    """True for If/Loop/Scan and any other node carrying a graph attribute."""
    return any(isinstance(v, gs.Graph) or (isinstance(v, (list, tuple)) and any(isinstance(x, gs.Graph) for x in v))
               for v in node.attrs.values())


def replace_with_constant(tensor: gs.Variable, value: np.ndarray) -> None:
    """Turn `tensor` into an initializer holding `value`, in place: its consumers keep reading it and
    its producer loses it as an output (the caller disconnects the producer)."""
    tensor.inputs.clear()
    tensor.to_constant(c_order(value))


def c_order(value) -> np.ndarray:
    """`value` as a C-contiguous array, copied only if needed (np.ascontiguousarray makes 0-d arrays 1-d)."""
    value = np.asarray(value)
    return value if value.flags.c_contiguous else value.copy(order="C")


def tidy(model: Model) -> None:
    """Drop dead nodes and sort topologically, like `model.cleanup()` but in linear time.

    gs's toposort costs ~80 ms on a 700-node graph, and the folding passes tidy after every change;
    for a main graph without subgraphs this does the same in a few ms. Models with subgraphs (outer-scope
    references need gs's bookkeeping) go through `model.cleanup()`.
    """
    graph = model.graph
    if any(has_subgraph(node) for node in graph.nodes):
        model.cleanup()
        return
    live: dict[int, gs.Node] = {}
    stack = [t.inputs[0] for t in graph.outputs if t.inputs]
    while stack:
        node = stack.pop()
        if id(node) in live:
            continue
        live[id(node)] = node
        stack.extend(t.inputs[0] for t in node.inputs if t.inputs)
    for node in graph.nodes:
        if id(node) not in live:
            node.inputs.clear()
            node.outputs.clear()
    graph.nodes = _toposorted([n for n in graph.nodes if id(n) in live])


def _toposorted(nodes: list[gs.Node]) -> list[gs.Node]:
    """Kahn's algorithm, keeping the current order among nodes that are ready at the same time."""
    index = {id(n): i for i, n in enumerate(nodes)}
    waiting = [sum(1 for t in n.inputs if t.inputs and id(t.inputs[0]) in index) for n in nodes]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(nodes[i])
        for tensor in nodes[i].outputs:
            for consumer in {id(c): c for c in tensor.outputs}.values():
                j = index.get(id(consumer))
                if j is None:
                    continue
                for t in consumer.inputs:
                    if t is tensor:
                        waiting[j] -= 1
                if waiting[j] == 0:
                    heapq.heappush(ready, j)
    if len(ordered) != len(nodes):
        raise ValueError("the graph has a cycle")
    return ordered


def rewire(model: Model, old: gs.Tensor, new: gs.Tensor, graph_outputs: set[int]) -> None:
    """Make every reader of `old` read `new`. `graph_outputs` are the ids of all graphs' output
    tensors: those go through `replace_uses`, which keeps output names; everything else is a fast
    direct rewrite."""
    if id(old) in graph_outputs:
        replace_uses(model, old, new)
        return
    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[i] = new


def output_ids(model: Model) -> set[int]:
    """Ids of the output tensors of the main graph and every subgraph."""
    return {id(t) for g in model.graphs() for t in g.outputs}


class NamePool:
    """Fresh tensor/node names for one pass run: the model's names are collected once, and every name
    handed out is remembered. (`Model.unique_name` rescans the whole model on every call, which is
    quadratic for a pass that creates hundreds of tensors.)"""

    def __init__(self, model: Model):
        self.taken: set[str] = set()
        for graph in model.graphs():
            for node in graph.nodes:
                self.taken.add(node.name)
                self.taken.update(t.name for t in node.inputs)
                self.taken.update(t.name for t in node.outputs)
            self.taken.update(t.name for t in graph.inputs + graph.outputs)
        self._counter = 0

    def fresh(self, base: str) -> str:
        name = base
        while name in self.taken:
            self._counter += 1
            name = f"{base}_{self._counter}"
        self.taken.add(name)
        return name
