"""Post-training int8 quantization into QDQ form, from calibration data, and the passes that prepare it.

    fold,insert-qdq(method=mse)                                         CNNs
    fold,insert-qdq(method=mse,reduce-range=true)                       ... run by onnxruntime on x86 without VNNI
    smooth-quant(alpha=0.75),insert-qdq(ops=[MatMul,Gather],outputs=false,activation-matmul=false)  transformers
    equalize,insert-qdq(per-channel=false,bias-correction=true)         per-tensor weights
    fold,insert-qdq(method=mse,int4-share=0.5,rounding=gptq)            half the weights in 4 bits (opset 21)

`insert-qdq`: plan (graphpress.quant.plan) -> calibrate activation ranges (graphpress.quant.calibrate)
-> edit (graphpress.quant.insert). The result is a plain ONNX model that onnxruntime runs unchanged (and
fuses into int8 kernels), with int8 weights: ~4x smaller. `smooth-quant` and `equalize` rewrite float
weights so that quantization loses less; `keep-float=auto` keeps the most sensitive nodes in float.
`int4-share` stores the least sensitive weights in 4 bits and `rounding=gptq` rounds weights against
their input statistics (graphpress.quant.lowbit, graphpress.quant.gptq); embedding tables are gathered
as integers and dequantized row by row (graphpress.quant.tables).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Literal

import numpy as np

from ..errors import GraphpressError
from ..ir import Model, infer_shapes
from ..quant.bias_correction import correct_biases
from ..quant.calibrate import collect_ranges, require_calibration
from ..quant.equalize import equalize
from ..quant.insert import Names, activation_parameters, existing_parameters, insert_qdq, store_bias, store_weight
from ..quant.lowbit import INT4_OPSET, StoredWeight, rounded_weights, weight_only_inputs
from ..quant.plan import QuantPlan, Selection, make_plan
from ..quant.scales import quantize_weight, scale_zero_point
from ..quant.tables import is_lookup_table, store_table
from ..quant.sensitivity import OutputProbe, choose_float_nodes, rank_by_sensitivity
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
    outputs: bool = True                              # quantize outputs of quantized ops (false: float outputs)
    reduce_range: bool = False                        # 7-bit weights: exact in onnxruntime's AVX2 (non-VNNI) kernels
    bias_correction: bool = False                     # fold the mean output shift of weight rounding into biases
    rounding: Literal["nearest", "gptq"] = "nearest"  # weight rounding: to nearest, or GPTQ on input statistics
    int4_share: float = 0.0                           # share of weight parameters stored in 4 bits (opset 21)
    gptq_batches: int = 32                            # rounding=gptq: calibration batches for input statistics

    keep_float: list[str] | None = None               # node names kept float, or [auto]: most sensitive first
    target_sqnr: float = 30.0                         # keep-float=auto: output SQNR (dB) to reach
    max_float: float = 0.2                            # keep-float=auto: at most this share of nodes kept float
    sensitivity_batches: int = 2                      # keep-float=auto: calibration batches scored

    def selection(self, keep_float: Iterable[str] = ()) -> Selection:
        defaults = Selection()
        names = tuple(self.exclude_nodes or ()) + tuple(keep_float)
        return Selection(ops=tuple(self.ops or defaults.ops), exclude_nodes=names,
                         exclude_ops=tuple(self.exclude_ops or ()), exclude_pattern=self.exclude_pattern,
                         activation_matmul=self.activation_matmul, outputs=self.outputs)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not 0.0 <= self.int4_share <= 1.0:
            raise GraphpressError(f"insert-qdq: int4-share={self.int4_share} is not a share between 0 and 1")
        if self.bias_correction and (self.int4_share > 0 or self.rounding != "nearest"):
            raise GraphpressError("insert-qdq: bias-correction estimates int8 round-to-nearest error; it does not "
                                  "combine with int4-share or rounding=gptq")
        dtypes = tensor_dtypes(model)
        plan = self.make_plan(model, dtypes, ctx)
        if plan.empty():
            return PassResult(changed=False, stats={"nodes": 0})
        opset = INT4_OPSET if self.int4_share > 0 else QDQ_OPSET
        if model.opset < opset:
            ensure_opset(model, opset, ctx)
            dtypes = tensor_dtypes(model)
            plan = self.make_plan(model, dtypes, ctx)
        if model.opset >= INT4_OPSET and self.activation_type == "int8":
            # onnxruntime 1.32 on x86 rewrites int8 activations to uint8 (QDQS8ToU8Transformer) and, at opset
            # 21, then fails its own type check on a QuantizeLinear that QDQPropagation made; uint8 avoids it.
            # Info, not a warning: there is nothing for the user to do (the demo printed it once per int4 trial)
            ctx.log.info("insert-qdq: opset %d model: uint8 activations (onnxruntime rejects int8 ones here)",
                            model.opset)
            return dataclasses.replace(self, activation_type="uint8").run(model, ctx)
        if self.bias_correction and plan.weights:
            batches = require_calibration(ctx.calibration, "insert-qdq(bias-correction=true)")
            if correct_biases(model, plan.weights, batches, self.reduce_range):
                plan = self.make_plan(model, dtypes, ctx)  # Convs without a bias now have one
        ranges = self.activation_ranges(model, plan, ctx) if plan.activations or plan.shared else {}
        rounded = self.rounded_weights(model, plan, ctx)
        stats = {}
        keep = list(self.keep_float or ())
        if keep == ["auto"]:
            keep, stats = self.most_sensitive(model, dtypes, plan, ranges, rounded, ctx)
        if keep:
            plan = self.make_plan(model, dtypes, ctx, keep)
        self.apply(model, plan, ranges, rounded)
        int4 = sum(1 for name in plan.weights if name in rounded and rounded[name].q.dtype.name == "int4")
        return PassResult(changed=True, stats={"nodes": len(plan.nodes), "activations": len(plan.activations),
                                               "weights": len(plan.weights), "int4_weights": int4,
                                               "biases": len(plan.biases), "float": len(keep), **stats})

    def rounded_weights(self, model: Model, plan: QuantPlan, ctx: PassContext) -> dict[str, StoredWeight]:
        """Weights rounded here rather than to nearest int8 by `apply`: 4-bit ones and GPTQ's."""
        if self.int4_share <= 0 and self.rounding == "nearest":
            return {}
        batches = require_calibration(ctx.calibration, "insert-qdq (int4-share / rounding=gptq)")
        return rounded_weights(model, plan.weights, self.int4_share, self.reduce_range, batches,
                               self.rounding == "gptq", self.gptq_batches, self.sensitivity_batches, ctx.log)

    def make_plan(self, model: Model, dtypes, ctx: PassContext, keep_float: Iterable[str] = ()) -> QuantPlan:
        return make_plan(model, dtypes, self.selection(keep_float), self.per_channel, ctx.log)

    def activation_ranges(self, model: Model, plan: QuantPlan, ctx: PassContext) -> dict[str, tuple[float, float]]:
        batches = require_calibration(ctx.calibration, f"insert-qdq (method={self.method})")
        # shared outputs too: keeping their MaxPool/Resize float (keep-float) makes them plain activations
        return collect_ranges(model, plan.activations + list(plan.shared), batches, self.method, self.activation_type,
                              self.symmetric_activations, self.percentile * (100 if self.percentile <= 1 else 1))

    def apply(self, model: Model, plan: QuantPlan, ranges: dict[str, tuple[float, float]],
              rounded: dict[str, StoredWeight] | None = None) -> None:
        apply_plan(model, plan, ranges, self.activation_type, self.symmetric_activations, self.reduce_range,
                   rounded)

    def most_sensitive(self, model: Model, dtypes, plan: QuantPlan, ranges, rounded, ctx: PassContext
                       ) -> tuple[list[str], dict]:
        """keep-float=auto: the nodes to keep float (sensitivity-ranked) and what was measured."""
        def build(float_nodes: set[str]) -> Model:
            variant = model.copy()
            self.apply(variant, self.make_plan(variant, dtypes, ctx, float_nodes), ranges, rounded)
            return variant

        probe = OutputProbe(model, ctx.calibration, self.sensitivity_batches)
        ranked = rank_by_sensitivity(plan.nodes, build, probe, ctx.log)
        cap = int(self.max_float * len(plan.nodes))
        keep, reached = choose_float_nodes(ranked, build, probe, self.target_sqnr, cap, log=ctx.log)
        ctx.reports["insert-qdq"] = {"sensitivity_db": dict(ranked), "float_nodes": keep, "sqnr_db": reached}
        return keep, {"sqnr_db": round(reached, 2)}


def apply_plan(model: Model, plan: QuantPlan, ranges: dict[str, tuple[float, float]], activation_type: str,
               symmetric: bool, reduce_range: bool = False, rounded: dict[str, StoredWeight] | None = None) -> None:
    """Edit `model` as `plan` says, with activation `ranges` from calibration; weights in `rounded`
    are stored as given (4-bit, GPTQ), the others rounded to nearest int8."""
    rounded = rounded or {}
    float_inputs = weight_only_inputs(model, plan.activations, plan.nodes, rounded)
    weight_only = {c.inputs[1].name for name in float_inputs for c in model.tensors()[name].outputs
                   if c.op == "MatMul"}
    tensors = model.tensors()
    names = Names(model)
    params = {name: activation_parameters(names, name, *scale_zero_point(*ranges[name], activation_type, symmetric))
              for name in plan.activations if name not in float_inputs}
    for output, source in plan.shared.items():
        found = params.get(source) or existing_parameters(tensors[source])
        if found is None:
            raise GraphpressError(f"tensor {source!r}: no quantization parameters to share with {output!r}")
        params[output] = found if source in params else activation_parameters(names, output, *found)
    weight_scales = {}
    for name, axis in plan.weights.items():
        stored = rounded.get(name)
        given = None if stored is None else (stored.q, stored.scale, stored.zero_point)
        if axis == 0 and is_lookup_table(tensors[name]):
            q, scale, _ = given or quantize_weight(model.constant_value(tensors[name]).astype(np.float32), 0)
            store_table(model, names, tensors[name], q, scale)
            continue
        weight_scales[name] = store_weight(model, names, tensors[name], axis, reduce_range, given,
                                           widen=name not in weight_only)
    for name, bias in plan.biases.items():
        existing = None if bias.activation in params else existing_parameters(tensors[bias.activation])
        if bias.activation in params or existing is not None:
            input_scale = params[bias.activation][0] if existing is None else existing[0]
            store_bias(model, names, tensors[name], input_scale, weight_scales[bias.weight])
    for name, constants in params.items():
        insert_qdq(model, names, tensors[name], constants)
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


@register("equalize")
class Equalize(Pass):
    """Cross-layer equalization: balance weight ranges across Conv -> ReLU -> Conv (no data needed)."""

    relu6_as_relu: bool = False   # also equalize across Clip(0,6), replacing it by Relu (changes the function)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        count = equalize(model, self.relu6_as_relu)
        return PassResult(changed=count > 0, stats={"pairs": count})
