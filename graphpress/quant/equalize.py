"""Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization"): balance weight ranges
across a Conv -> ReLU -> Conv chain so that per-tensor (and per-channel) int8 weights lose less.

ReLU is positively homogeneous, relu(x / s) = relu(x) / s for s > 0, so scaling output channel i of
the first Conv by 1/s_i and input channel i of the second by s_i keeps the function. With r1_i, r2_i
the channels' weight ranges, s_i = sqrt(r1_i / r2_i) makes both sqrt(r1_i r2_i). ReLU6 (Clip 0..6) is
not homogeneous; `relu6_as_relu` treats it as ReLU, as the paper does for MobileNetV2 (it changes the
function wherever an activation exceeds 6, so it is off by default and measured when on).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model

#: sweeps over all pairs (chains Conv -> depthwise -> Conv need a few to settle)
SWEEPS = 4


def _single_consumer(model: Model, tensor: gs.Tensor) -> gs.Node | None:
    consumers = tensor.outputs
    if len(consumers) != 1 or model.is_graph_output(tensor):
        return None
    return consumers[0]


def _homogeneous(model: Model, node: gs.Node, relu6_as_relu: bool) -> bool:
    if node.op == "Relu":
        return True
    if node.op == "Clip" and relu6_as_relu:
        low = model.constant_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
        return low is not None and float(low) == 0.0
    return False


def equalization_pairs(model: Model, relu6_as_relu: bool = False) -> list[tuple[gs.Node, gs.Node]]:
    """(first Conv, second Conv) joined by one ReLU (or ReLU6), each tensor read only by the next node."""
    pairs = []
    for first in model.nodes(op="Conv", recursive=False):
        if first.attrs.get("group", 1) != 1 and first.attrs.get("group") != _out_channels(model, first):
            continue
        activation = _single_consumer(model, first.outputs[0])
        if activation is None or not _homogeneous(model, activation, relu6_as_relu):
            continue
        second = _single_consumer(model, activation.outputs[0])
        if second is None or second.op != "Conv" or second.inputs[0] is not activation.outputs[0]:
            continue
        if all(_weights(model, n) is not None for n in (first, second)) and _second_ok(model, first, second):
            pairs.append((first, second))
    return pairs


def _weights(model: Model, conv: gs.Node) -> np.ndarray | None:
    value = model.constant_value(conv.inputs[1])
    if value is None or (len(conv.inputs) > 2 and conv.inputs[2].name and model.constant_value(conv.inputs[2]) is None):
        return None
    return value


def _out_channels(model: Model, conv: gs.Node) -> int:
    value = model.constant_value(conv.inputs[1])
    return -1 if value is None else value.shape[0]


def _second_ok(model: Model, first: gs.Node, second: gs.Node) -> bool:
    """The second Conv is dense or depthwise over the first's output channels."""
    group = second.attrs.get("group", 1)
    return group == 1 or group == _out_channels(model, first) == _out_channels(model, second)


#: scales this close to 1 mean the pair is already balanced
TOLERANCE = 1e-3


def equalize_pair(model: Model, first: gs.Node, second: gs.Node) -> bool:
    """Rescale the shared channels of one pair in place; False if they were already balanced."""
    w1, w2 = model.constant_value(first.inputs[1]), model.constant_value(second.inputs[1])
    depthwise = second.attrs.get("group", 1) != 1
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    w2_in = w2 if depthwise else np.swapaxes(w2, 0, 1)        # [channel, ...]
    r2 = np.abs(w2_in).reshape(w2_in.shape[0], -1).max(axis=1)
    s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1)), 1.0).astype(np.float32)
    if np.allclose(s, 1.0, rtol=0, atol=TOLERANCE):
        return False
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    first.inputs[1] = gs.Constant(model.unique_name(f"{first.inputs[1].name}_eq"), (w1 / s.reshape(shape1)).astype(np.float32))
    if len(first.inputs) > 2 and first.inputs[2].name:
        bias = model.constant_value(first.inputs[2])
        first.inputs[2] = gs.Constant(model.unique_name(f"{first.inputs[2].name}_eq"), (bias / s).astype(np.float32))
    shape2 = (-1,) + (1,) * (w2.ndim - 1) if depthwise else (1, -1) + (1,) * (w2.ndim - 2)
    second.inputs[1] = gs.Constant(model.unique_name(f"{second.inputs[1].name}_eq"), (w2 * s.reshape(shape2)).astype(np.float32))
    return True


def equalize(model: Model, relu6_as_relu: bool = False) -> int:
    """Equalize every pair (up to SWEEPS times); a Clip(0, M) treated as ReLU becomes a Relu.
    Returns how many pairs changed."""
    pairs = equalization_pairs(model, relu6_as_relu)
    changed: set[str] = set()  # names of the first Conv of each pair that moved
    for _ in range(SWEEPS):
        moved = {first.name for first, second in pairs if equalize_pair(model, first, second)}
        if not moved:
            break
        changed |= moved
    for first, _ in pairs:
        activation = first.outputs[0].outputs[0]
        if activation.op == "Clip" and first.name in changed:
            data = activation.inputs[0]
            activation.inputs.clear()
            activation.inputs.append(data)
            activation.op = "Relu"
    if changed:
        model.cleanup()
    return len(changed)
