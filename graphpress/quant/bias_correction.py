"""Bias correction: cancel the mean output shift that weight quantization causes (Nagel et al., 2019).

Rounding a layer's weights, W_q = W + dW, shifts its output by dW E[x]: for a depthwise convolution or
a channel with few, similar weights the rounding errors do not average out, and the shift adds up layer
after layer. With E[x] (per input channel) measured on calibration data, the bias absorbs it:
b <- b - dW E[x]. A Conv without a bias gets one. Padding is ignored (E[x] is taken over the whole
input, border pixels included), which is exact for 1x1 convolutions and Gemm.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model, activation_batches
from .scales import dequantize, quantize_weight


def correctable(model: Model, node: gs.Node) -> bool:
    """Conv (any group count) and Gemm without transA, with constant weights (and bias, if any)."""
    if node.op not in ("Conv", "Gemm") or model.constant_value(node.inputs[1]) is None:
        return False
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0
                              or node.attrs.get("beta", 1.0) != 1.0):
        return False
    return len(node.inputs) < 3 or model.constant_value(node.inputs[2]) is not None


def input_means(model: Model, nodes: list[gs.Node], batches: Iterable[dict]) -> dict[str, np.ndarray]:
    """Mean of each node's input per channel (axis 1 for Conv, the last axis for Gemm's A)."""
    names = list(dict.fromkeys(n.inputs[0].name for n in nodes))
    axis = {n.inputs[0].name: 1 if n.op == "Conv" else -1 for n in nodes}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for values in activation_batches(model, names, batches, progress="bias correction"):
        for name in names:
            x = np.moveaxis(np.asarray(values[name], np.float64), axis[name], -1)
            flat = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + flat.sum(axis=0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
    return {name: sums[name] / counts[name] for name in sums}


def output_shift(node: gs.Node, weight: np.ndarray, quantized: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """dW E[x] per output channel."""
    delta = quantized.astype(np.float64) - weight
    if node.op == "Gemm":
        delta = delta.T if node.attrs.get("transB", 0) else delta  # [K, N]
        return mean @ delta
    groups = node.attrs.get("group", 1)
    out_channels, in_per_group = delta.shape[:2]
    per_input = delta.reshape(out_channels, in_per_group, -1).sum(axis=2)  # [O, C/g]
    group_of = np.arange(out_channels) // (out_channels // groups)
    means = mean.reshape(groups, in_per_group)[group_of]                    # [O, C/g]
    return (per_input * means).sum(axis=1)


def correct_biases(model: Model, weights: dict[str, int | None], batches: Iterable[dict],
                   reduce_range: bool = False) -> int:
    """Fold the shift of each planned weight's quantization into its node's bias; returns nodes corrected."""
    nodes = [n for n in model.nodes(op=("Conv", "Gemm"), recursive=False)
             if n.inputs[1].name in weights and correctable(model, n)]
    if not nodes:
        return 0
    means = input_means(model, nodes, batches)
    for node in nodes:
        weight = model.constant_value(node.inputs[1]).astype(np.float64)
        axis = weights[node.inputs[1].name]
        q, scale, zero_point = quantize_weight(weight.astype(np.float32), axis, reduce_range)
        shift = output_shift(node, weight, dequantize(q, scale, zero_point, axis), means[node.inputs[0].name])
        bias = model.constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        corrected = (np.zeros_like(shift) if bias is None else bias.astype(np.float64)) - shift
        constant = gs.Constant(model.unique_name(f"{node.name}_bias_corrected"), corrected.astype(np.float32))
        if len(node.inputs) > 2:
            node.inputs[2] = constant
        else:
            node.inputs.append(constant)
    return len(nodes)
