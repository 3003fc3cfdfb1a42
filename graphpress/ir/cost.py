"""Multiply-accumulate counts per node and per op type, from static shapes.

MACs are what channel pruning and low-rank splitting reduce, and what `graphpress inspect` reports. They
are counted per sample: a symbolic (batch) dimension counts as 1. Ops that do no multiply-accumulate work
worth counting (activations, pooling, element-wise arithmetic) count 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .model import Model, in_default_domain
from .standalone import inferred_types


@dataclass
class MacCount:
    """Total MACs of a model, and the same split by node name and by op type."""

    total: int = 0
    by_node: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)


def macs(model: Model) -> MacCount:
    """Count the MACs of every Conv, ConvTranspose, Gemm and MatMul (per sample) in the main graph.

    Shapes come from onnx shape inference on the weightless skeleton (milliseconds, no copy of the
    weights); a node whose shapes stay unknown counts 0. Unnamed nodes are listed as `<op>#<index>`.
    """
    shapes = tensor_shapes(model)
    shapes.update({name: tuple(dims) for name, (_, dims) in inferred_types(model).items() if dims is not None})
    count = MacCount()
    for index, node in enumerate(model.graph.nodes):
        value = node_macs(node, shapes)
        if not value:
            continue
        name = node.name or f"{node.op}#{index}"
        count.by_node[name] = count.by_node.get(name, 0) + value
        count.by_op[node.op] = count.by_op.get(node.op, 0) + value
        count.total += value
    return count


def tensor_shapes(model: Model) -> dict[str, tuple]:
    """Tensor name -> shape (dims may be symbolic strings) for every tensor whose shape is known."""
    return {name: tuple(t.shape) for name, t in model.graph.tensors().items() if t.shape is not None}


def node_macs(node: gs.Node, shapes: dict[str, tuple]) -> int:
    """MACs of one node given tensor shapes by name (0 for ops that are not counted or unknown shapes)."""
    counter = _COUNTERS.get(node.op)
    if counter is None or not in_default_domain(node):
        return 0
    try:
        dims = [_per_sample(shapes.get(t.name)) if t.name else None for t in node.inputs]
        outs = [_per_sample(shapes.get(t.name)) for t in node.outputs]
        value = counter(node, dims, outs)
    except (TypeError, IndexError, ValueError):
        return 0
    return int(value) if value else 0


def _per_sample(shape):
    """The shape with symbolic dims replaced by 1, or None when unknown."""
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) and d >= 0 else 1 for d in shape)


def _conv(node, dims, outs):
    out, weight = outs[0], dims[1]
    return np.prod(out, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64)


def _conv_transpose(node, dims, outs):
    data, weight = dims[0], dims[1]
    return np.prod(data, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64)


def _gemm(node, dims, outs):
    a = dims[0]
    k = a[0] if node.attrs.get("transA", 0) else a[1]
    return np.prod(outs[0], dtype=np.int64) * k


def _matmul(node, dims, outs):
    a = dims[0]
    k = a[-1] if len(a) > 1 else a[0]
    return np.prod(outs[0], dtype=np.int64) * k


_COUNTERS = {"Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul}
