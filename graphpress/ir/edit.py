"""Edits that keep a graph valid: rewire uses, bypass a node, insert a node after a tensor.

The subtle case is a graph output: its *name* is the model's interface, so replacing an output tensor
renames the replacement (or, if that is impossible, routes it through an Identity) instead of changing
what the model's users see.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .model import Model


def replace_uses(model: Model, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of `old` read `new` instead; graph outputs keep their names."""
    if old is new:
        return
    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[i] = new
    for graph in model.graphs():
        if not any(t is old for t in graph.outputs):
            continue
        if _can_take_name(model, new):
            name = old.name
            old.name = model.unique_name(name + "_replaced")
            new.name = name
            if new.dtype is None:
                new.dtype = old.dtype
            if new.shape is None:
                new.shape = old.shape
            _swap_output(graph, old, new)
        else:
            # `new` is an input, a constant or already an output: an Identity carries the old name
            producer = old.inputs[0] if old.inputs else None
            if producer is not None:
                for i, t in enumerate(producer.outputs):
                    if t is old:
                        producer.outputs[i] = gs.Variable(model.unique_name(old.name + "_unused"),
                                                          dtype=old.dtype, shape=old.shape)
            identity = gs.Node("Identity", name=model.unique_name(old.name + "_identity"),
                               inputs=[new], outputs=[old])
            graph.nodes.append(identity)


def _can_take_name(model: Model, tensor: gs.Tensor) -> bool:
    if not isinstance(tensor, gs.Variable) or not tensor.inputs:
        return False
    return all(not any(t is tensor for t in g.inputs + g.outputs) for g in model.graphs())


def _swap_output(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    graph.outputs = [new if t is old else t for t in graph.outputs]


def remove_node(model: Model, node: gs.Node, keep_input: int = 0) -> None:
    """Bypass and disconnect a single-output node: its consumers read `node.inputs[keep_input]`."""
    if len(node.outputs) != 1:
        raise ValueError(f"remove_node: {node.op} node {node.name!r} has {len(node.outputs)} outputs")
    output = node.outputs[0]
    source = node.inputs[keep_input]
    replace_uses(model, output, source)
    node.inputs.clear()
    node.outputs.clear()


def insert_node_after(model: Model, tensor: gs.Tensor, op: str, extra_inputs=(), attrs=None,
                      name: str | None = None, graph: gs.Graph | None = None) -> gs.Node:
    """Insert `op(tensor, *extra_inputs)` so that every former consumer of `tensor` reads its output."""
    graph = graph or model.graph
    out = gs.Variable(model.unique_name(f"{tensor.name}_{op.lower()}"), dtype=tensor.dtype, shape=tensor.shape)
    consumers = list(tensor.outputs)
    if any(t is tensor for t in graph.outputs):
        # the new node's output takes over the graph output's name; the old tensor becomes internal
        out.name, tensor.name = tensor.name, model.unique_name(tensor.name + "_before_" + op.lower())
        _swap_output(graph, tensor, out)
    node = gs.Node(op, name=name or model.unique_name(f"{out.name}_{op.lower()}"), attrs=attrs or {},
                   inputs=[tensor, *extra_inputs], outputs=[out])
    for consumer in consumers:
        for i, t in enumerate(consumer.inputs):
            if t is tensor:
                consumer.inputs[i] = out
    graph.nodes.append(node)
    return node


def new_constant(model: Model, base_name: str, values: np.ndarray) -> gs.Constant:
    """A new initializer with a unique name."""
    # np.array, not np.ascontiguousarray: that one turns a 0-d array into a 1-d one
    return gs.Constant(model.unique_name(base_name), np.array(values, order="C"))
