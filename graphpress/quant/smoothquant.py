"""SmoothQuant: move activation outliers into the weights before int8 quantization.

Transformer activations have a few channels with values 10-100x larger than the rest, which forces a
coarse per-tensor int8 grid on every channel; weights are easy to quantize per channel. For
Y = X W (X: [..., K], W: [K, N]) and any positive s in R^K,

    Y = (X diag(1/s)) (diag(s) W),   s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)

flattens X's channels (alpha -> 1 moves all difficulty to W). MatMuls reading the same X share one s
(computed with the max over all their weights), and X / s is one Mul node in front of them (Xiao et
al., 2023). The model's function is unchanged up to float rounding; only its quantization improves.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model
from .insert import Names
from .calibrate import channel_absmax, require_calibration

#: floor for channel maxima (dead channels would otherwise give s = 0 or infinity)
EPSILON = 1e-5


#: the rule name signing the Mul nodes this module adds (insert-qdq keeps them float)
RULE = "smooth-quant"


def is_smoothing(model: Model, node: gs.Node | None) -> bool:
    """True for a Mul node SmoothQuant added."""
    return node is not None and model.node_docs.get(node.name, "").endswith(f"rule {RULE}")


def smoothing_groups(model: Model, allowed=lambda node: True) -> dict[str, list[gs.Node]]:
    """{activation tensor: MatMuls that multiply it by a constant 2-D weight}, skipping inputs that
    are already smoothed (so that running twice changes nothing)."""
    groups: dict[str, list[gs.Node]] = defaultdict(list)
    for node in model.nodes(op="MatMul", recursive=False):
        weight = model.constant_value(node.inputs[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            continue
        x = node.inputs[0]
        if model.constant_value(x) is None and not is_smoothing(model, model.producer(x)) and allowed(node):
            groups[x.name].append(node)
    return dict(groups)


def smoothing_factors(act_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_k = max|X_k|^alpha / max|W_k|^(1-alpha), the weight max taken over every weight's row k."""
    weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    s = np.maximum(act_max, EPSILON) ** alpha / np.maximum(weight_max, EPSILON) ** (1 - alpha)
    return np.where(np.isfinite(s) & (s > 0), s, 1.0).astype(np.float32)


def smooth(model: Model, batches: Iterable[dict] | None, alpha: float = 0.5, allowed=lambda node: True) -> int:
    """Apply SmoothQuant to every MatMul with a constant weight; returns how many activations were smoothed."""
    groups = smoothing_groups(model, allowed)
    if not groups:
        return 0
    batches = require_calibration(batches, "smooth-quant")
    act_max = channel_absmax(model, list(groups), batches, "SmoothQuant")
    tensors = model.tensors()
    names = Names(model)
    for name, nodes in groups.items():
        weights = [model.constant_value(n.inputs[1]) for n in nodes]
        s = smoothing_factors(act_max[name], weights, alpha)
        x = tensors[name]
        scaled = gs.Variable(names.new(f"{name}_smoothed"), dtype=np.float32, shape=x.shape)
        divisor = gs.Constant(names.new(f"{name}_smooth_scale"), (1.0 / s).astype(np.float32))
        mul = gs.Node("Mul", name=names.new(f"{name}_smooth"), inputs=[x, divisor], outputs=[scaled])
        model.graph.nodes.append(mul)
        model.mark_made_by(mul, RULE)
        for node, w in zip(nodes, weights):
            node.inputs[0] = scaled
            node.inputs[1] = gs.Constant(names.new(f"{node.inputs[1].name}_smoothed"),
                                         (w * s[:, None]).astype(np.float32))
    model.cleanup()
    return len(groups)
