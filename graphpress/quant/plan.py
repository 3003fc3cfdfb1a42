"""Which tensors of a float model become int8: the quantization plan, decided before any edit.

Per covered op, each input plays a role:
- *activation*: a computed tensor, fake-quantized with a calibrated range (QuantizeLinear ->
  DequantizeLinear after its producer, shared by every consumer);
- *weight*: a float constant stored as int8 with a DequantizeLinear in front, symmetric, per channel
  along the axis that indexes output channels (Conv 0, ConvTranspose 1, MatMul's right side its last
  axis, Gemm's B 0 with transB else 1), per tensor otherwise;
- *bias*: Conv/ConvTranspose/Gemm bias stored as int32 with scale input scale x weight scale.
Outputs of covered ops are activations too, except that an output feeding only a Relu or Clip is
quantized after the activation (the int8 kernel applies it), and MaxPool/Resize outputs reuse their
input's parameters (their values are a subset / interpolation of it).

A tensor already produced by DequantizeLinear or read by QuantizeLinear is left alone, which makes the
pass idempotent and lets it complete a partly quantized model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model
from .smoothquant import is_smoothing

COVERED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Concat", "MaxPool", "AveragePool",
               "GlobalAveragePool", "GlobalMaxPool", "Resize", "Gather")
#: ops whose constant table is stored int8 (per row) while their output stays float: embedding lookups
WEIGHT_ONLY_OPS = ("Gather",)
#: activations an int8 kernel applies before requantizing: quantize after them, not between
FUSABLE_ACTIVATIONS = ("Relu", "Clip")
#: ops whose output reuses the input's scale and zero point
SHARED_RANGE_OPS = ("MaxPool", "GlobalMaxPool", "Resize")
#: inputs that can hold data for each op (others are shapes, scales, sizes)
_DATA_INPUTS = {"MaxPool": 1, "AveragePool": 1, "GlobalAveragePool": 1, "GlobalMaxPool": 1, "Resize": 1}


@dataclass(frozen=True)
class Bias:
    """A bias input to store as int32: its scale is the scale of `activation` times that of `weight`."""

    activation: str
    weight: str


@dataclass
class QuantPlan:
    """Tensors (by name) to quantize and how."""

    activations: list[str] = field(default_factory=list)   # to calibrate
    shared: dict[str, str] = field(default_factory=dict)   # output -> input whose parameters it reuses
    weights: dict[str, int | None] = field(default_factory=dict)  # constant -> channel axis (None: per tensor)
    biases: dict[str, Bias] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)         # names of the nodes being quantized

    def empty(self) -> bool:
        return not (self.activations or self.shared or self.weights or self.biases)


@dataclass(frozen=True)
class Selection:
    """Which nodes may be quantized: covered ops minus exclusions."""

    ops: tuple[str, ...] = COVERED_OPS
    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    exclude_pattern: str = ""          # regular expression searched in node names
    activation_matmul: bool = True     # MatMul of two activations (attention scores)
    outputs: bool = True               # quantize outputs too (False: int8 inputs, float outputs)

    def why_not(self, node: gs.Node) -> str | None:
        """None if `node` may be quantized, else the reason it may not."""
        if node.op not in self.ops:
            return f"op {node.op} is not quantized"
        if node.op in self.exclude_ops:
            return f"op {node.op} is excluded"
        if node.name in self.exclude_nodes:
            return "excluded by name"
        if self.exclude_pattern and re.search(self.exclude_pattern, node.name or ""):
            return f"name matches {self.exclude_pattern!r}"
        return None


def is_float(tensor: gs.Tensor, dtypes: dict[str, np.dtype]) -> bool:
    dtype = dtypes.get(tensor.name)
    return dtype is not None and np.dtype(dtype) == np.float32


def already_quantized(tensor: gs.Tensor) -> bool:
    """True if `tensor` is a DequantizeLinear output or already feeds a QuantizeLinear."""
    producer = tensor.inputs[0] if tensor.inputs else None
    return (producer is not None and producer.op == "DequantizeLinear") or \
        any(c.op == "QuantizeLinear" for c in tensor.outputs)


def weight_axis(node: gs.Node, index: int, ndim: int) -> int | None:
    """The output-channel axis of constant input `index` of `node`, or None to quantize it per tensor."""
    if node.op == "Conv" and index == 1:
        return 0
    if node.op == "ConvTranspose" and index == 1:
        return 1 if node.attrs.get("group", 1) == 1 else None
    if node.op == "MatMul" and index == 1 and ndim >= 2:
        return ndim - 1
    if node.op == "Gemm" and index == 1:
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "Gather" and index == 0 and node.attrs.get("axis", 0) == 0 and ndim == 2:
        return 0  # one scale per embedding row
    return None


def bias_index(node: gs.Node) -> int | None:
    """The input that is a bias added to the product (int32 candidate), if the op has one."""
    if node.op in ("Conv", "ConvTranspose"):
        return 2
    if node.op == "Gemm" and node.attrs.get("alpha", 1.0) == 1.0 and node.attrs.get("beta", 1.0) == 1.0:
        return 2
    return None


def fused_output(model: Model, tensor: gs.Tensor) -> gs.Tensor:
    """Where an output should be quantized: after a Relu/Clip that is its only consumer."""
    consumers = tensor.outputs
    if len(consumers) == 1 and consumers[0].op in FUSABLE_ACTIVATIONS and not model.is_graph_output(tensor):
        activation = consumers[0]
        if activation.inputs[0] is tensor and all(model.constant_value(t) is not None
                                                   for t in activation.inputs[1:] if t.name):
            return activation.outputs[0]
    return tensor


def make_plan(model: Model, dtypes: dict[str, np.dtype], selection: Selection, per_channel: bool,
              log) -> QuantPlan:
    """Decide, node by node, which tensors to quantize (see the module docstring)."""
    plan = QuantPlan()
    for node in model.nodes(recursive=False):
        reason = selection.why_not(node)
        if reason is None and is_smoothing(model, node):
            reason = "a SmoothQuant scaling: kept float so that the smoothed activation is quantized"
        if reason is None:
            reason = _plan_node(model, node, dtypes, selection, per_channel, plan)
        if reason is not None and node.op in COVERED_OPS:
            log.debug("insert-qdq: skip %s %r: %s", node.op, node.name, reason)
    return plan


def _plan_node(model: Model, node: gs.Node, dtypes, selection: Selection, per_channel: bool,
               plan: QuantPlan) -> str | None:
    """Add `node`'s tensors to `plan`; return why the node is skipped, or None."""
    if node.op in WEIGHT_ONLY_OPS:
        return _plan_table(model, node, per_channel, plan)
    data = node.inputs[:_DATA_INPUTS.get(node.op, len(node.inputs))]
    if not node.outputs or not is_float(node.outputs[0], dtypes):
        return "its output is not float32"
    bias = bias_index(node)
    activations, weights = [], {}
    for index, tensor in enumerate(data):
        if not tensor.name or index == bias:
            continue
        value = model.constant_value(tensor)
        if value is not None:
            if value.dtype != np.float32 or value.size == 0:
                return f"constant input {tensor.name!r} is not float32"
            weights[tensor.name] = weight_axis(node, index, value.ndim) if per_channel else None
        elif not is_float(tensor, dtypes):
            return f"input {tensor.name!r} is not float32 (or its type is unknown)"
        else:
            activations.append(tensor)
    if not activations:
        return "no computed input (constant folding's job)"
    if node.op == "MatMul" and len(activations) == 2 and not selection.activation_matmul:
        return "a product of two activations (activation-matmul=false)"
    plan.nodes.append(node.name)
    for tensor in activations:
        _add_activation(plan, tensor)
    for name, axis in weights.items():
        if not already_quantized(model.tensors()[name]):
            plan.weights[name] = axis if plan.weights.get(name, axis) == axis else None
    _plan_bias(model, node, bias, activations, plan)
    if selection.outputs:
        _plan_output(model, node, activations[0], plan)
    return None


def _plan_table(model: Model, node: gs.Node, per_channel: bool, plan: QuantPlan) -> str | None:
    """A lookup table (Gather's data) stored as int8; the gathered rows stay float."""
    table = node.inputs[0]
    value = model.constant_value(table)
    if value is None or value.dtype != np.float32 or value.size == 0:
        return "its table is not a float32 constant"
    if already_quantized(table):
        return "its table is already quantized"
    plan.nodes.append(node.name)
    plan.weights[table.name] = weight_axis(node, 0, value.ndim) if per_channel else None
    return None


def _add_activation(plan: QuantPlan, tensor: gs.Tensor) -> None:
    if not already_quantized(tensor) and tensor.name not in plan.activations and tensor.name not in plan.shared:
        plan.activations.append(tensor.name)


def _plan_bias(model: Model, node: gs.Node, bias: int | None, activations, plan: QuantPlan) -> None:
    if bias is None or len(node.inputs) <= bias or not node.inputs[bias].name:
        return
    tensor, weight = node.inputs[bias], node.inputs[1]
    value = model.constant_value(tensor)
    if value is None or value.dtype != np.float32 or value.ndim != 1 or already_quantized(tensor):
        return
    if weight.name in plan.weights and node.inputs[0] is activations[0]:
        plan.biases[tensor.name] = Bias(activations[0].name, weight.name)


def _plan_output(model: Model, node: gs.Node, first_input: gs.Tensor, plan: QuantPlan) -> None:
    if node.op in SHARED_RANGE_OPS:
        output = node.outputs[0]
        if not already_quantized(output) and output.name not in plan.activations:
            plan.shared[output.name] = first_input.name
        return
    _add_activation(plan, fused_output(model, node.outputs[0]))
