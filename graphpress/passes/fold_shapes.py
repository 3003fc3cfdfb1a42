"""`fold-shapes`: shape computations become constants wherever the dims they read are static.

A transformer exported with symbolic batch and sequence sizes computes `Shape(x)[2]` (the hidden size,
static) next to `Shape(x)[0]` (the batch, symbolic). The first is a constant; the second is not. This
pass infers shapes (on a weightless skeleton of the graph, so it is fast) and replaces
- `Shape` and `Size` of a tensor whose shape is static,
- `Gather(Shape(x), indices)` and `Slice(Shape(x), ...)` whose selected dims are static,
by initializers; `fold-constants` then folds the Unsqueeze/Concat/... chains that read them.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model
from .base import Pass, PassContext, PassResult
from .nodes import replace_with_constant, tidy
from ..ir.model import in_default_domain
from .registry import register
from ..ir.standalone import annotate_shapes


@register("fold-shapes")
class FoldShapes(Pass):
    """Replace Shape/Size, and Gather/Slice of a Shape, by constants where the dims they read are static.

    Works on the main graph, with shapes from onnx shape inference (symbolic dims stay symbolic)."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not any(n.op in ("Shape", "Size") for n in model.graph.nodes):
            return PassResult(changed=False)
        annotate_shapes(model)
        outputs = {id(t) for t in model.graph.outputs}
        folded = 0
        for node in list(model.graph.nodes):
            if node.op not in ("Shape", "Size") or not in_default_domain(node) or not node.outputs:
                continue
            with ctx.at(node):
                dims = shape_dims(node)
                if dims is None:
                    ctx.log.debug("fold-shapes: keep %s %r: the shape of %r is unknown", node.op, node.name,
                                  node.inputs[0].name)
                    continue
                if node.op == "Size":
                    folded += _fold(node, np.array(np.prod(dims, dtype=np.int64)), outputs, ctx)
                elif all(isinstance(d, int) for d in dims):
                    folded += _fold(node, np.array(dims, dtype=np.int64), outputs, ctx)
                else:
                    shape = node.outputs[0]
                    folded += sum(_fold_selection(reader, shape, dims, outputs, ctx)
                                  for reader in list(shape.outputs))
        if folded:
            tidy(model)
        return PassResult(changed=folded > 0, stats={"folded": folded})


def shape_dims(node: gs.Node) -> list | None:
    """The dims a Shape node returns (ints where static, None/str where not), or None if unknown.
    For Size, all dims (Size needs every one static)."""
    shape = node.inputs[0].shape
    if shape is None:
        return None
    dims = [d if isinstance(d, int) and d >= 0 else None for d in shape]
    if node.op == "Size":
        return dims if all(d is not None for d in dims) else None
    start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
    return dims[slice(start, end)]


def _fold(node: gs.Node, value: np.ndarray, outputs: set[int], ctx: PassContext) -> int:
    tensor = node.outputs[0]
    if id(tensor) in outputs:
        ctx.log.debug("fold-shapes: keep %s %r: it is a graph output", node.op, node.name)
        return 0
    replace_with_constant(tensor, value)
    node.inputs.clear()
    node.outputs.clear()
    return 1


def _fold_selection(reader: gs.Node, shape: gs.Tensor, dims: list, outputs: set[int], ctx: PassContext) -> int:
    """Fold a Gather or Slice that reads a partly static shape, if it selects only static dims."""
    selected = _selected(reader, shape, dims)
    if selected is None:
        return 0
    if any(d is None for d in np.ravel(selected)):
        ctx.log.debug("fold-shapes: keep %s %r: it selects a symbolic dim", reader.op, reader.name)
        return 0
    return _fold(reader, np.asarray(selected, dtype=np.int64), outputs, ctx)


def _selected(reader: gs.Node, shape: gs.Tensor, dims: list):
    """The dims (nested like the result) that a Gather/Slice on the shape picks, or None if it is not
    a Gather/Slice with constant parameters reading the shape as its data input."""
    if not in_default_domain(reader) or not reader.inputs or reader.inputs[0] is not shape or len(reader.outputs) != 1:
        return None
    params = [Model.constant_value(t) if t.name else None for t in reader.inputs[1:]]
    if reader.op == "Gather" and params and params[0] is not None and reader.attrs.get("axis", 0) in (0, -1):
        indices = np.asarray(params[0]).astype(np.int64)
        if np.any(indices < -len(dims)) or np.any(indices >= len(dims)):
            return None
        return np.array(dims, dtype=object)[indices]
    if reader.op == "Slice":
        if "starts" in reader.attrs:  # opset < 10: parameters are attributes
            params = [reader.attrs["starts"], reader.attrs["ends"]] + \
                ([reader.attrs["axes"]] if "axes" in reader.attrs else [])
        if len(params) < 2 or any(p is None for p in params):
            return None
        starts, ends = (np.asarray(p).astype(np.int64).ravel() for p in params[:2])
        axes = np.asarray(params[2]).ravel() if len(params) > 2 else np.zeros(1)
        steps = np.asarray(params[3]).ravel() if len(params) > 3 else np.ones(1)
        if starts.size != 1 or ends.size != 1 or axes.size != 1 or int(axes[0]) not in (0, -1) or steps.size != 1:
            return None
        return dims[slice(_clamp(starts[0]), _clamp(ends[0]), int(steps[0]))]
    return None


def _clamp(index: np.int64) -> int:
    """Slice bounds like INT64_MAX mean 'to the end'; python slicing clamps, but wants python ints."""
    return int(max(min(int(index), 2**62), -2**62))
