"""Where two runtimes disagree on a QDQ model: each quantized activation checked on identical inputs.

Comparing the final outputs of two executions of a QDQ model says little about either: a single
element that one runtime rounds up and the other down (its value within float error of a rounding
tie) is one quantization step apart at that tensor, and every quantized layer after it carries the
difference further. On MiniLM (six transformer layers, every MatMul input quantized) one such step in
layer 0 moves the last hidden state by 0.3-1.0, in onnxruntime alone (benchmarks/bench_int8_agreement.py).

So the comparison is made per segment. `teacher_forced` cuts the model at every quantized
activation (the output of a QuantizeLinear on a computed tensor): the tensor stays a graph output and
its consumers read a new graph input `<name>__fed` instead. Fed the reference runtime's values of
those tensors, each segment (the float and integer arithmetic from one set of quantized tensors to the
next QuantizeLinear) starts from the same integers in both runtimes, and `disagreements` counts, per
quantized tensor, the elements that differ, by how many steps, and how far the reference's float
value before rounding lies from a rounding tie (in steps): a segment computed right differs only on
elements within float error of a tie, and by one step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import GraphpressError
from ..ir.execute import run

#: suffix of the graph input that replaces a quantized activation for its consumers
FED = "__fed"


def activation_quantizers(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The main graph's QuantizeLinear nodes of computed tensors (not of constants), in graph order."""
    constants = {t.name for t in proto.graph.initializer}
    constants.update(o for n in proto.graph.node if n.op_type == "Constant" for o in n.output)
    return [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]


def reference_values(proto: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """onnxruntime's values (graph optimizations off: ONNX's float semantics) of every quantized
    activation and of the float tensor it quantizes, by tensor name."""
    names = [name for node in activation_quantizers(proto) for name in (node.output[0], node.input[0])]
    if not names:
        raise GraphpressError("the model has no QuantizeLinear on a computed tensor: nothing to compare per segment")
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    present = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(names) if name not in present)
    return run(exposed, inputs, outputs=list(dict.fromkeys(names)))


def teacher_forced(proto: onnx.ModelProto, values: dict[str, np.ndarray], tensors: list[str] | None = None) -> onnx.ModelProto:
    """A copy of `proto` whose quantized activations (`tensors`, default all) are graph outputs that
    nothing reads: their consumers read graph inputs `<name>__fed` of the shapes and types in `values`
    (see module doc). Cut at one tensor only, a value fed there propagates through the rest of the model."""
    forced = onnx.ModelProto()
    forced.CopyFrom(proto)
    quantized = _cut(proto, tensors)
    missing = [name for name in quantized if name not in values]
    if missing:
        raise GraphpressError(f"no value given for the quantized activation {missing[0]!r}")
    renamed = {name: name + FED for name in quantized}
    for node in forced.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    present = {o.name for o in forced.graph.output}
    for name in quantized:
        value = values[name]
        elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        forced.graph.input.append(onnx.helper.make_tensor_value_info(renamed[name], elem, list(value.shape)))
        if name not in present:
            forced.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, list(value.shape)))
    return forced


def forced_inputs(proto: onnx.ModelProto, inputs: dict[str, np.ndarray], values: dict[str, np.ndarray],
                  tensors: list[str] | None = None) -> dict:
    """The feed of `teacher_forced(proto, values, tensors)`: the model's own inputs and every `<name>__fed`."""
    feed = dict(inputs)
    feed.update({name + FED: values[name] for name in _cut(proto, tensors)})
    return feed


def _cut(proto: onnx.ModelProto, tensors: list[str] | None) -> list[str]:
    """The quantized activations to cut at: `tensors` (checked), or all of them."""
    quantized = [node.output[0] for node in activation_quantizers(proto)]
    if tensors is None:
        return quantized
    unknown = [name for name in tensors if name not in quantized]
    if unknown:
        raise GraphpressError(f"{unknown[0]!r} is not the output of a QuantizeLinear on a computed tensor")
    return list(tensors)


@dataclass
class Disagreement:
    """One quantized activation: how many of its elements differ from the reference, the largest
    difference in quantization steps, and the largest distance (in steps) of the reference's float
    value from a rounding tie among the differing elements (0: exactly on a tie)."""

    tensor: str
    elements: int
    differing: int
    max_steps: int
    max_tie_distance: float


def disagreements(proto: onnx.ModelProto, got: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> list[Disagreement]:
    """Per quantized activation of `proto`, `got` (one runtime's outputs of the teacher-forced model)
    against `values` (`reference_values`)."""
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    result = []
    for node in activation_quantizers(proto):
        name = node.output[0]
        scale = constants.get(node.input[1])
        if scale is None or scale.size != 1:
            raise GraphpressError(f"QuantizeLinear {node.name or name!r}: per-tensor constant scale expected")
        want = values[name].astype(np.int64)
        steps = np.abs(np.asarray(got[name]).astype(np.int64) - want)
        scaled = values[node.input[0]].astype(np.float64) / float(scale.reshape(()))
        tie_distance = np.abs(scaled - np.floor(scaled) - 0.5)[steps > 0]
        result.append(Disagreement(name, int(want.size), int(np.count_nonzero(steps)), int(steps.max(initial=0)),
                                   float(tie_distance.max(initial=0.0))))
    return result
