"""Graph edits that realise a quantization plan: Q/DQ pairs on activations, int8 weights, int32 biases.

Weights and biases are stored quantized (int8 / int32 initializers behind a DequantizeLinear), which is
what makes the model ~4x smaller; activations get a QuantizeLinear -> DequantizeLinear pair that
onnxruntime fuses with its neighbours into int8 kernels (QLinearConv, QLinearMatMul, ...).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

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


def insert_qdq(model: Model, names: Names, tensor: gs.Tensor, scale: np.ndarray, zero_point: np.ndarray
               ) -> gs.Node:
    """Put QuantizeLinear -> DequantizeLinear after `tensor`; every former consumer reads the DQ.

    A graph output keeps its name: the DQ output takes it and the float tensor is renamed.
    """
    base = short_name(tensor.name)
    zero_point = np.asarray(zero_point)
    params = [names.constant(f"{base}_scale", np.asarray(scale, np.float32)),
              names.constant(f"{base}_zero_point", zero_point)]
    consumers = list(tensor.outputs)
    quantized = gs.Variable(names.new(f"{base}_q"), dtype=zero_point.dtype, shape=tensor.shape)
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


def _dequantized_constant(model: Model, names: Names, tensor: gs.Tensor, q: np.ndarray, scale: np.ndarray,
                          zero_point: np.ndarray, axis: int | None) -> None:
    """Replace every use of constant `tensor` by DequantizeLinear(q, scale, zero_point[, axis])."""
    base = short_name(tensor.name)
    inputs = [names.constant(f"{base}_quantized", q), names.constant(f"{base}_scale", scale),
              names.constant(f"{base}_zero_point", zero_point)]
    output = gs.Variable(names.new(f"{base}_dequantized"), dtype=np.float32, shape=list(q.shape))
    attrs = {"axis": int(axis)} if axis is not None and np.ndim(scale) == 1 else {}
    for consumer in list(tensor.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is tensor:
                consumer.inputs[i] = output
    model.graph.nodes.append(gs.Node("DequantizeLinear", name=names.new(f"{base}_dequantize"),
                                     attrs=attrs, inputs=inputs, outputs=[output]))


def store_weight(model: Model, names: Names, tensor: gs.Tensor, axis: int | None, reduce_range: bool = False,
                 rounded: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Store constant `tensor` as symmetric int8 (per channel along `axis`), or as the already `rounded`
    (q, scale, zero point) given; returns its scale."""
    value = model.constant_value(tensor).astype(np.float32)
    if axis is not None and value.ndim == 0:
        axis = None
    q, scale, zero_point = rounded if rounded is not None else quantize_weight(value, axis, reduce_range)
    _dequantized_constant(model, names, tensor, q, scale, zero_point, axis)
    return scale


def store_bias(model: Model, names: Names, tensor: gs.Tensor, input_scale: np.ndarray,
               weight_scale: np.ndarray) -> None:
    """Store constant bias `tensor` as int32 with scale input_scale * weight_scale."""
    value = model.constant_value(tensor).astype(np.float32)
    q, scale = quantize_bias(value, input_scale, weight_scale)
    zero_point = np.zeros(scale.shape, np.int32)
    _dequantized_constant(model, names, tensor, q, scale, zero_point, 0 if scale.ndim == 1 else None)
