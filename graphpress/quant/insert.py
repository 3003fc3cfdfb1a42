"""Graph edits that realise a quantization plan: Q/DQ pairs on activations, int8 weights, int32 biases.

Weights and biases are stored quantized (int8 / int32 initializers behind a DequantizeLinear), which is
what makes the model ~4x smaller; activations get a QuantizeLinear -> DequantizeLinear pair that
onnxruntime fuses with its neighbours into int8 kernels (QLinearConv, QLinearMatMul, ...).

Only information is stored: weights and biases are symmetric, so their DequantizeLinear has no zero-point
input (optional in ONNX, 0 by default); a per-channel bias scale, by definition the input scale times the
weight scale, is computed by a Mul of those two initializers (onnxruntime folds it when the session is
made) instead of being stored a third time. On MobileNetV2 with 4-bit weights that is ~0.15 MB of 2.2.

4-bit weights of an op whose activation is quantized too are read through `Cast(to=INT8)`: onnxruntime
has no int4 convolution, and a DequantizeLinear of INT4 would turn them into float every run, while the
Cast of a constant is folded once when the session is made, leaving the int8 QDQ pattern its int8
kernels take (the file keeps the 4-bit values). Weight-only 4-bit MatMuls keep DequantizeLinear(INT4),
which onnxruntime fuses into MatMulNBits.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import GraphpressError
from ..ir import Model
from .scales import quantize_bias, quantize_weight


class Names:
    """Unique names for the many tensors and nodes one quantization adds.

    `Model.unique_name` rescans the whole graph per call; a quantized transformer needs ~1000 new
    names, so the taken set is read once here and kept up to date.
    """

    def __init__(self, model: Model):
        self.taken = model._names()

    def new(self, base: str) -> str:
        name, counter = base, 0
        while name in self.taken:
            name, counter = f"{base}_{counter}", counter + 1
        self.taken.add(name)
        return name

    def constant(self, base: str, value: np.ndarray) -> gs.Constant:
        """A new initializer that keeps 0-d values 0-d (per-tensor scales must be scalars for
        onnxruntime's int8 kernels; `ir.new_constant` makes them 1-d)."""
        value = np.asarray(value)
        return gs.Constant(self.new(base), value if value.ndim == 0 else np.ascontiguousarray(value))


#: longest base for the names of new tensors and nodes (converted TF models have 100-character names,
#: which would otherwise be repeated in every scale, zero point and Q/DQ node and cost a visible share
#: of a small int8 model's size)
MAX_BASE_NAME = 32


def short_name(name: str) -> str:
    """A compact base for names derived from `name`: its last ';'-separated part, tail-truncated."""
    return name.split(";")[-1][-MAX_BASE_NAME:]


def existing_parameters(tensor: gs.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, zero point) of the DequantizeLinear producing `tensor` or of a QuantizeLinear reading it."""
    nodes = ([tensor.inputs[0]] if tensor.inputs and tensor.inputs[0].op == "DequantizeLinear" else []) + \
        [c for c in tensor.outputs if c.op == "QuantizeLinear"]
    for node in nodes:
        if len(node.inputs) >= 3:
            scale, zero_point = Model.constant_value(node.inputs[1]), Model.constant_value(node.inputs[2])
            if scale is not None and zero_point is not None:
                return scale, zero_point
    return None


def activation_parameters(names: Names, tensor_name: str, scale: np.ndarray, zero_point: np.ndarray
                          ) -> tuple[gs.Constant, gs.Constant]:
    """The scale and zero-point initializers of an activation's QuantizeLinear/DequantizeLinear pair."""
    base = short_name(tensor_name)
    return (names.constant(f"{base}_scale", np.asarray(scale, np.float32)),
            names.constant(f"{base}_zero_point", np.asarray(zero_point)))


def insert_qdq(model: Model, names: Names, tensor: gs.Tensor, params: tuple[gs.Constant, gs.Constant]) -> gs.Node:
    """Put QuantizeLinear -> DequantizeLinear after `tensor`, with (scale, zero point) initializers
    `params`; every former consumer reads the DQ.

    A graph output keeps its name: the DQ output takes it and the float tensor is renamed.
    """
    base = short_name(tensor.name)
    params = list(params)
    consumers = list(tensor.outputs)
    quantized = gs.Variable(names.new(f"{base}_q"), dtype=params[1].values.dtype, shape=tensor.shape)
    dequantized = gs.Variable(names.new(f"{base}_dq"), dtype=np.float32, shape=tensor.shape)
    quant = gs.Node("QuantizeLinear", names.new(f"{base}_quantize"), inputs=[tensor, *params], outputs=[quantized])
    dequant = gs.Node("DequantizeLinear", names.new(f"{base}_dequantize"), inputs=[quantized, *params],
                      outputs=[dequantized])
    for consumer in consumers:
        for i, t in enumerate(consumer.inputs):
            if t is tensor:
                consumer.inputs[i] = dequantized
    if model.is_graph_output(tensor):
        interface = tensor.name
        tensor.name = names.new(f"{base}_float")
        dequantized.name = interface
        model.graph.outputs = [dequantized if t is tensor else t for t in model.graph.outputs]
    model.graph.nodes.extend([quant, dequant])
    return dequant


def _dequantized_constant(model: Model, names: Names, tensor: gs.Tensor, q: np.ndarray, scale: gs.Tensor,
                          axis: int | None, widen: bool = False) -> None:
    """Replace every use of constant `tensor` by DequantizeLinear(q, scale[, axis]) (zero point 0, the
    default); `widen`: q (INT4) is read through Cast(to=INT8), see the module docstring."""
    base = short_name(tensor.name)
    stored = names.constant(f"{base}_quantized", q)
    if widen:
        wide = gs.Variable(names.new(f"{base}_int8"), dtype=np.int8, shape=list(q.shape))
        model.graph.nodes.append(gs.Node("Cast", name=names.new(f"{base}_widen"), attrs={"to": onnx.TensorProto.INT8},
                                         inputs=[stored], outputs=[wide]))
        stored = wide
    output = gs.Variable(names.new(f"{base}_dequantized"), dtype=np.float32, shape=list(q.shape))
    attrs = {"axis": int(axis)} if axis is not None and len(scale.shape or ()) == 1 else {}
    for consumer in list(tensor.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is tensor:
                consumer.inputs[i] = output
    model.graph.nodes.append(gs.Node("DequantizeLinear", name=names.new(f"{base}_dequantize"),
                                     attrs=attrs, inputs=[stored, scale], outputs=[output]))


def store_weight(model: Model, names: Names, tensor: gs.Tensor, axis: int | None, reduce_range: bool = False,
                 rounded: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, widen: bool = False
                 ) -> gs.Constant:
    """Store constant `tensor` as symmetric int8 (per channel along `axis`), or as the already `rounded`
    (q, scale, zero point 0) given; `widen`: 4-bit q read through Cast(to=INT8). Returns the scale
    initializer."""
    value = model.constant_value(tensor).astype(np.float32)
    if axis is not None and value.ndim == 0:
        axis = None
    q, scale, zero_point = rounded if rounded is not None else quantize_weight(value, axis, reduce_range)
    if np.any(np.asarray(zero_point).astype(np.int64)):
        raise GraphpressError(f"weight {tensor.name!r}: weights are stored symmetric (zero point 0)")
    scale_tensor = names.constant(f"{short_name(tensor.name)}_scale", np.asarray(scale, np.float32))
    _dequantized_constant(model, names, tensor, q, scale_tensor, axis, widen and np.dtype(q.dtype).name == "int4")
    return scale_tensor


def store_bias(model: Model, names: Names, tensor: gs.Tensor, input_scale: np.ndarray | gs.Constant,
               weight_scale: gs.Constant) -> None:
    """Store constant bias `tensor` as int32 with scale input_scale * weight_scale; a per-channel scale is
    computed in the graph from the two initializers when `input_scale` is one (the product is the same
    float32 multiplication either way)."""
    value = model.constant_value(tensor).astype(np.float32)
    given = input_scale.values if isinstance(input_scale, gs.Constant) else input_scale
    q, scale = quantize_bias(value, given, weight_scale.values)
    base = short_name(tensor.name)
    product = np.float32(given) * np.asarray(weight_scale.values, np.float32)
    if isinstance(input_scale, gs.Constant) and scale.ndim == 1 and np.array_equal(product, scale):
        scale_tensor = gs.Variable(names.new(f"{base}_scale"), dtype=np.float32, shape=list(scale.shape))
        model.graph.nodes.append(gs.Node("Mul", name=names.new(f"{base}_scale_product"),
                                         inputs=[input_scale, weight_scale], outputs=[scale_tensor]))
    else:
        scale_tensor = names.constant(f"{base}_scale", scale)
    _dequantized_constant(model, names, tensor, q, scale_tensor, 0 if scale.ndim == 1 else None)
