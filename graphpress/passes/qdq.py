"""`insert-qdq`: post-training int8 quantization into QDQ form, from calibration data.

    fold,insert-qdq(method=entropy,per-channel=true,activation-type=int8)

Plan (graphpress.quant.plan) -> calibrate activation ranges (graphpress.quant.calibrate) -> edit
(graphpress.quant.insert). The result is a plain ONNX model that onnxruntime runs unchanged (and fuses
into int8 kernels), with int8 weights: ~4x smaller.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np

from ..errors import GraphpressError
from ..ir import Model, infer_shapes
from ..quant.bias_correction import correct_biases
from ..quant.calibrate import collect_ranges, require_calibration
from ..quant.insert import existing_parameters, insert_qdq, store_bias, store_weight
from ..quant.plan import QuantPlan, Selection, make_plan
from ..quant.scales import scale_zero_point
from ..quant.smoothquant import smooth
from .base import Pass, PassContext, PassResult
from .registry import register

Method = Literal["minmax", "moving-average", "percentile", "entropy", "mse"]


def tensor_dtypes(model: Model) -> dict[str, np.dtype]:
    """Element type of every main-graph tensor whose type is known or inferable."""
    inferred = infer_shapes(model)
    return {name: np.dtype(t.dtype) for name, t in inferred.graph.tensors().items()
            if t.dtype is not None and not isinstance(t.dtype, int)}


#: first opset whose DequantizeLinear takes a per-channel `axis`
QDQ_OPSET = 13


def ensure_opset(model: Model, opset: int, ctx: PassContext) -> None:
    """Convert `model` in place to default-domain `opset` if it is older (onnx's version converter)."""
    if model.opset >= opset:
        return
    import onnx.version_converter
    ctx.log.info("insert-qdq: converting the model from opset %d to %d (per-channel QDQ)", model.opset, opset)
    try:
        converted = onnx.version_converter.convert_version(model.to_onnx(), opset)
    except Exception as exc:  # the converter raises plain RuntimeErrors naming the op
        raise GraphpressError(f"cannot convert the model from opset {model.opset} to {opset} for QDQ: {exc}") from exc
    model.graph = Model.from_onnx(converted).graph


@register("insert-qdq")
class InsertQdq(Pass):
    """Quantize to int8 QDQ: per-channel int8 weights, int32 biases, calibrated int8/uint8 activations."""

    method: Method = "minmax"                         # observer choosing activation ranges
    per_channel: bool = True                          # int8 weights with one scale per output channel
    activation_type: Literal["int8", "uint8"] = "int8"  # integer type of activations
    symmetric_activations: bool = False               # activation zero point fixed at the middle of the range
    percentile: float = 99.999                        # kept share of values, method=percentile
    ops: list[str] | None = None                            # op types to quantize (default: every covered op)
    exclude_nodes: list[str] | None = None                  # node names to keep in float
    exclude_ops: list[str] | None = None                    # op types to keep in float
    exclude_pattern: str = ""                         # regex: nodes whose name matches stay float
    activation_matmul: bool = True                    # also quantize MatMul of two activations (attention)
    reduce_range: bool = False                        # 7-bit weights: exact in onnxruntime's AVX2 (non-VNNI) kernels
    bias_correction: bool = False                     # fold the mean output shift of weight rounding into biases

    def selection(self) -> Selection:
        defaults = Selection()
        return Selection(ops=tuple(self.ops or defaults.ops), exclude_nodes=tuple(self.exclude_nodes or ()),
                         exclude_ops=tuple(self.exclude_ops or ()), exclude_pattern=self.exclude_pattern,
                         activation_matmul=self.activation_matmul)

    def plan(self, model: Model, ctx: PassContext) -> QuantPlan:
        return make_plan(model, tensor_dtypes(model), self.selection(), self.per_channel, ctx.log)

    def activation_ranges(self, model: Model, plan: QuantPlan, ctx: PassContext) -> dict[str, tuple[float, float]]:
        batches = require_calibration(ctx.calibration, f"insert-qdq (method={self.method})")
        return collect_ranges(model, plan.activations, batches, self.method, self.activation_type,
                              self.symmetric_activations, self.percentile * (100 if self.percentile <= 1 else 1))

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ensure_opset(model, QDQ_OPSET, ctx)
        plan = self.plan(model, ctx)
        if self.bias_correction and plan.weights:
            batches = require_calibration(ctx.calibration, "insert-qdq(bias-correction=true)")
            if correct_biases(model, plan.weights, batches, self.reduce_range):
                plan = self.plan(model, ctx)  # Convs without a bias now have one
        if plan.empty():
            return PassResult(changed=False, stats={"nodes": 0})
        ranges = self.activation_ranges(model, plan, ctx) if plan.activations else {}
        apply_plan(model, plan, ranges, self.activation_type, self.symmetric_activations, self.reduce_range)
        return PassResult(changed=True, stats={"nodes": len(plan.nodes), "activations": len(plan.activations),
                                               "weights": len(plan.weights), "biases": len(plan.biases)})


def apply_plan(model: Model, plan: QuantPlan, ranges: dict[str, tuple[float, float]], activation_type: str,
               symmetric: bool, reduce_range: bool = False) -> None:
    """Edit `model` as `plan` says, with activation `ranges` from calibration."""
    tensors = model.tensors()
    params = {name: scale_zero_point(lo, hi, activation_type, symmetric) for name, (lo, hi) in ranges.items()}
    for output, source in plan.shared.items():
        found = params.get(source) or existing_parameters(tensors[source])
        if found is None:
            raise GraphpressError(f"tensor {source!r}: no quantization parameters to share with {output!r}")
        params[output] = found
    weight_scales = {name: store_weight(model, tensors[name], axis, reduce_range) for name, axis in plan.weights.items()}
    for name, bias in plan.biases.items():
        source = params.get(bias.activation) or existing_parameters(tensors[bias.activation])
        if source is not None:
            store_bias(model, tensors[name], source[0], weight_scales[bias.weight])
    for name, (scale, zero_point) in params.items():
        insert_qdq(model, tensors[name], scale, zero_point)
    model.cleanup()


@register("smooth-quant")
class SmoothQuant(Pass):
    """Move activation outliers into MatMul weights (X/s, s*W) so that int8 activations lose less."""

    alpha: float = 0.5            # share of the quantization difficulty moved from activations to weights
    exclude_pattern: str = ""     # regex: MatMuls whose name matches are left alone

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        pattern = re.compile(self.exclude_pattern) if self.exclude_pattern else None
        count = smooth(model, ctx.calibration, self.alpha,
                       allowed=lambda node: pattern is None or not pattern.search(node.name or ""))
        return PassResult(changed=count > 0, stats={"smoothed": count})
