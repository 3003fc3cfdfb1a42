"""Standalone ONNX models cut out of a graph: for shape inference and for evaluating constant nodes.

Exporting the whole model (weights included) costs a copy of every weight, and an onnxruntime session on
it costs a full load. The folding passes only need two small things:

- `skeleton(model)`: the main graph's nodes with weights replaced by typed inputs, so that onnx shape
  inference runs in milliseconds instead of serializing hundreds of megabytes;
- `evaluate(model, nodes)`: the values of `nodes` whose inputs are all constants, computed in one
  onnxruntime session holding only those nodes and the constants they read.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx

from ..errors import GraphpressError
from .execute import session
from .model import Model

log = logging.getLogger("graphpress.ir")

#: constants up to this many elements stay initializers in the skeleton (shape inference reads their
#: values, e.g. a Reshape's target shape); larger ones become typed graph inputs
SKELETON_MAX_ELEMENTS = 1024


def skeleton(model: Model, max_elements: int = SKELETON_MAX_ELEMENTS) -> onnx.ModelProto:
    """The main graph as a ModelProto whose large constants are typed inputs instead of initializers."""
    graph = model.graph
    nodes = [OnnxExporter.export_node(node) for node in graph.nodes]
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    initializers = []
    for tensor in _constants_read_by(graph.nodes):
        if _element_count(tensor) <= max_elements:
            initializers.append(OnnxExporter.export_tensor_proto(tensor))
        else:
            inputs.append(onnx.helper.make_tensor_value_info(tensor.name, dtype_to_onnx(tensor.dtype),
                                                             list(tensor.shape)))
    outputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
    proto_graph = onnx.helper.make_graph(nodes, graph.name or "skeleton", inputs, outputs, initializers)
    return _model_proto(model, proto_graph)


def evaluate(model: Model, nodes: Sequence[gs.Node], known: dict[str, np.ndarray] | None = None
             ) -> dict[str, np.ndarray]:
    """Run `nodes` (in topological order, every input a constant, a value in `known` or another of
    `nodes`' outputs) in one onnxruntime session; returns output name -> value for every output that is
    a tensor. Raises GraphpressError when onnxruntime cannot build or run that model.
    """
    produced = {t.name for node in nodes for t in node.outputs if t.name}
    initializers = [OnnxExporter.export_tensor_proto(t) for t in _constants_read_by(nodes) if t.name not in produced]
    needed = {t.name for node in nodes for t in node.inputs if t.name and not isinstance(t, gs.Constant)}
    initializers += [numpy_helper.from_array(value, name) for name, value in (known or {}).items()
                     if name in needed and name not in produced]
    proto_graph = onnx.helper.make_graph(
        [OnnxExporter.export_node(node) for node in nodes], "fold", [],
        [onnx.ValueInfoProto(name=name) for name in sorted(produced)], initializers)
    sess = session(_model_proto(model, proto_graph))
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, {})
    except Exception as exc:  # onnxruntime's own exception types
        raise GraphpressError(f"onnxruntime could not evaluate constant nodes: {exc}") from exc
    return {name: value for name, value in zip(names, values) if isinstance(value, np.ndarray)}


def _constants_read_by(nodes: Iterable[gs.Node]) -> list[gs.Constant]:
    seen: dict[str, gs.Constant] = {}
    for node in nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) and tensor.name not in seen:
                seen[tensor.name] = tensor
    return list(seen.values())


def _element_count(tensor: gs.Constant) -> int:
    return int(np.prod(tensor.shape)) if tensor.shape is not None else 0


def _model_proto(model: Model, graph: onnx.GraphProto) -> onnx.ModelProto:
    imports = {"": model.opset}
    for entry in model.graph.import_domains or []:
        imports.setdefault(entry.domain, entry.version)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in imports.items()])
    if model.graph.ir_version is not None:
        # at least IR 4: before it, initializers had to be listed as inputs too, and shape inference
        # ignores those that are not (the skeleton lists only the graph's real inputs)
        proto.ir_version = max(model.graph.ir_version, 4)
    return proto


def inferred_types(model: Model) -> dict[str, tuple[int, list]]:
    """Main-graph value name -> (onnx elem type, dims) from onnx shape inference with symbolic data
    propagation on the skeleton (milliseconds, where inference on the full model serializes every weight).
    Symbolic dims are strings, unknown ones None. Values inference cannot type are absent; an inference
    failure is logged and gives {}."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), check_type=False, strict_mode=False,
                                                     data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        log.debug("shape inference on the skeleton failed: %s", exc)
        return {}
    return {info.name: (info.type.tensor_type.elem_type,
                        _dims(info.type.tensor_type.shape) if info.type.tensor_type.HasField("shape") else None)
            for info in inferred.graph.value_info if info.type.HasField("tensor_type")}


def annotate_shapes(model: Model) -> int:
    """Fill in dtype and shape of main-graph tensors that lack them (see `inferred_types`); a known dim
    is never replaced by an unknown one. Returns how many tensors gained a shape."""
    tensors = model.graph.tensors()
    gained = 0
    for name, (elem_type, dims) in inferred_types(model).items():
        tensor = tensors.get(name)
        if not isinstance(tensor, gs.Variable):
            continue
        if tensor.dtype is None and elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        if dims is not None and (tensor.shape is None or _unknown_dims(tensor.shape) > _unknown_dims(dims)):
            tensor.shape = dims
            gained += 1
    return gained


def _dims(shape: onnx.TensorShapeProto) -> list:
    """Ints where static, the model's symbolic names where it has them, None elsewhere. The `unk__N`
    names onnx invents are dropped: they restart at unk__0 on every inference run, so names from two runs
    would claim that unrelated dims are equal (onnxruntime plans memory on such claims)."""
    return [d.dim_value if d.HasField("dim_value")
            else (d.dim_param if d.dim_param and not d.dim_param.startswith("unk__") else None)
            for d in shape.dim]


def _unknown_dims(shape) -> int:
    return sum(not isinstance(d, int) or d < 0 for d in shape)
