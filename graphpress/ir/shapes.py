"""Shape inference that tolerates symbolic dimensions and ops onnx cannot infer.

onnx's inference keeps `dim_param` names (batch, sequence) as they are; where it fails (custom domains,
unsupported ops) the model keeps whatever shapes it already had and the failure is logged, because a
missing shape should make a pass skip a node, never abort the pipeline.
"""

from __future__ import annotations

import logging

import onnx
import onnx.shape_inference

from .model import Model

log = logging.getLogger("graphpress.ir")


def infer_shapes(model: Model, data_prop: bool = True) -> Model:
    """Return `model` with value shapes and dtypes filled in wherever onnx can infer them."""
    proto = model.to_onnx()
    # IR < 4 lets onnx ignore initializers that are not also listed as graph inputs: infer as IR 4
    proto.ir_version = max(proto.ir_version, 4)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False,
                                                     data_prop=data_prop)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        log.info("shape inference stopped early: %s", exc)
        return model
    result = Model.from_onnx(inferred)
    result.graph.ir_version = model.graph.ir_version
    result.proto_fields, result.node_docs = model.proto_fields, model.node_docs
    return result


def static_shape(tensor) -> tuple[int, ...] | None:
    """The tensor's shape if every dimension is a known integer, else None."""
    shape = getattr(tensor, "shape", None)
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return tuple(shape)
