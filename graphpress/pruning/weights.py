"""Reading and slicing the constant inputs that pruning edits: weights, biases, per-channel parameters.

A parameter is an initializer, the output of a Constant node, or a DequantizeLinear of a constant (the
weight side of a QDQ model). Slicing never edits a shared constant in place: the node gets a new constant
(and, for QDQ weights, a new DequantizeLinear), and dead ones are removed by the pass's cleanup.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model, new_constant


def _dequantize_node(tensor: gs.Tensor) -> gs.Node | None:
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "DequantizeLinear" and not producer.domain:
        return producer
    return None


def is_sliceable(model: Model, tensor: gs.Tensor) -> bool:
    """True if `tensor` is a constant, or a DequantizeLinear of constants, that pruning can slice."""
    if not tensor.name:
        return False
    if model.constant_value(tensor) is not None:
        return True
    dq = _dequantize_node(tensor)
    return dq is not None and all(not t.name or model.constant_value(t) is not None for t in dq.inputs)


def weight_value(model: Model, tensor: gs.Tensor) -> np.ndarray:
    """The float value of a sliceable parameter (a QDQ weight is dequantized)."""
    value = model.constant_value(tensor)
    if value is not None:
        return np.asarray(value, dtype=np.float32)
    dq = _dequantize_node(tensor)
    x = model.constant_value(dq.inputs[0]).astype(np.float64)
    scale = model.constant_value(dq.inputs[1]).astype(np.float64)
    zero = model.constant_value(dq.inputs[2]).astype(np.float64) if len(dq.inputs) > 2 and dq.inputs[2].name \
        else np.zeros_like(scale)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        axis = dq.attrs.get("axis", 1) % x.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (x - zero) * scale


def weight_shape(model: Model, tensor: gs.Tensor) -> tuple[int, ...]:
    """The shape of a sliceable parameter, without materializing a float copy."""
    value = model.constant_value(tensor)
    if value is None:
        value = model.constant_value(_dequantize_node(tensor).inputs[0])
    return tuple(value.shape)


def take(value: np.ndarray, cuts: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """`value` with only the kept indices (boolean masks) along the given axes."""
    for axis, keep in cuts:
        value = np.compress(keep, value, axis=axis)
    return np.ascontiguousarray(value)


def slice_input(model: Model, node: gs.Node, index: int, cuts: list[tuple[int, np.ndarray]]) -> None:
    """Replace `node.inputs[index]` by its value restricted to the kept indices along each cut axis."""
    tensor = node.inputs[index]
    value = model.constant_value(tensor)
    if value is not None:
        node.inputs[index] = new_constant(model, tensor.name, take(value, cuts))
        return
    dq = _dequantize_node(tensor)
    x = dq.inputs[0]
    x_value = model.constant_value(x)
    inputs = [new_constant(model, x.name, take(x_value, cuts))]
    dq_axis = dq.attrs.get("axis", 1) % x_value.ndim
    for param in dq.inputs[1:]:
        p_value = model.constant_value(param) if param.name else None
        if p_value is None:
            inputs.append(param)
            continue
        param_cuts = [(0, keep) for axis, keep in cuts if axis == dq_axis and p_value.ndim == 1 and p_value.size > 1]
        inputs.append(new_constant(model, param.name, take(p_value, param_cuts)) if param_cuts else param)
    out = gs.Variable(model.unique_name(tensor.name + "_pruned"), dtype=tensor.dtype)
    clone = gs.Node("DequantizeLinear", name=model.unique_name((dq.name or "dq") + "_pruned"),
                    attrs=dict(dq.attrs), inputs=inputs, outputs=[out])
    model.graph.nodes.append(clone)
    node.inputs[index] = out


def replace_constant(model: Model, node: gs.Node, index: int, value: np.ndarray) -> None:
    """Give `node.inputs[index]` a new constant value (a fresh initializer; the old one may be shared)."""
    node.inputs[index] = new_constant(model, node.inputs[index].name or "value", value)
