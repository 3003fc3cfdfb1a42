"""Fusions that fold a following per-channel affine op into the layer before it, as pattern rules.

- `fuse-conv-bn`: Conv -> BatchNormalization (inference) becomes one Conv; the new weights are computed
  in float64 and cast back, so the only error is the final rounding.
- `fuse-conv-affine`: Conv (or BatchNormalization) -> Mul/Add by a per-channel (or scalar) constant
  becomes one Conv (or BatchNormalization).
- `fuse-matmul-add`: MatMul(x, W) -> Add(bias) becomes Gemm where x is 2-D, W a 2-D constant and the bias
  a constant that broadcasts to the output without changing its shape. Elsewhere the pair is left alone.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import Model
from .base import Pass, PassContext, PassResult
from .nodes import NamePool, c_order
from .pattern import Rule, apply_rules
from .registry import register
from ..ir.standalone import annotate_shapes

FLOAT_KINDS = "f"


def bind_names(rule: Rule, names: NamePool) -> Rule:
    """The rules here are written with rewrites `(names, model, nodes)`: the run's `NamePool` gives new
    tensors fresh names cheaply. This binds it, giving the `(model, nodes)` rewrite `apply_rules` calls."""
    return dataclasses.replace(rule, rewrite=functools.partial(rule.rewrite, names))


def _conv_weights(model: Model, conv: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | str:
    """The Conv's constant weight and bias (None if absent), or why they are not usable."""
    weight = model.constant_value(conv.inputs[1])
    if weight is None or weight.dtype.kind not in FLOAT_KINDS:
        return "Conv weight is not a float constant"
    bias = None
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        bias = model.constant_value(conv.inputs[2])
        if bias is None:
            return "Conv bias is not a constant"
    return weight, bias


def _fused_conv(names: NamePool, conv: gs.Node, last: gs.Node, weight: np.ndarray, bias: np.ndarray,
                dtype: np.dtype) -> tuple[list[gs.Node], gs.Tensor]:
    """A copy of `conv` with new weight and bias (computed in float64, stored as `dtype`)."""
    out = last.outputs[0]
    base = out.name
    fused = gs.Node("Conv", names.fresh(last.name or base), attrs=dict(conv.attrs), inputs=[
        conv.inputs[0],
        gs.Constant(names.fresh(f"{base}/weight"), c_order(weight.astype(dtype))),
        gs.Constant(names.fresh(f"{base}/bias"), c_order(bias.astype(dtype))),
    ], outputs=[gs.Variable(names.fresh(f"{base}/fused"), dtype=out.dtype, shape=out.shape)])
    return [fused], fused.outputs[0]


# ---- Conv + BatchNormalization --------------------------------------------------------------------
def _check_conv_bn(model: Model, nodes: list[gs.Node]) -> str | None:
    conv, bn = nodes
    weights = _conv_weights(model, conv)
    if isinstance(weights, str):
        return weights
    if bn.attrs.get("training_mode", 0) or any(t.outputs for t in bn.outputs[1:]):
        return "BatchNormalization is in training mode"
    if bn.attrs.get("spatial", 1) != 1:
        return "BatchNormalization is not spatial (opset < 9, spatial=0)"
    params = [model.constant_value(t) for t in bn.inputs[1:5]]
    if any(p is None for p in params):
        return "BatchNormalization parameters are not constants"
    if any(p.shape != (weights[0].shape[0],) for p in params):
        return "BatchNormalization parameters are not one value per Conv output channel"
    return None


def _rewrite_conv_bn(names: NamePool, model: Model, nodes: list[gs.Node]):
    conv, bn = nodes
    weight, bias = _conv_weights(model, conv)
    scale, beta, mean, var = (model.constant_value(t).astype(np.float64) for t in bn.inputs[1:5])
    factor = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    bias64 = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    new_weight = weight.astype(np.float64)
    new_weight *= factor.reshape((-1,) + (1,) * (weight.ndim - 1))  # in place: weights can be large
    new_bias = (bias64 - mean) * factor + beta
    return _fused_conv(names, conv, bn, new_weight, new_bias, weight.dtype)


CONV_BN = Rule("conv-bn", ("Conv", "BatchNormalization"), _check_conv_bn, _rewrite_conv_bn)


# ---- Conv / BatchNormalization + per-channel Mul / Add ---------------------------------------------------
def _affine_operand(model: Model, nodes: list[gs.Node], rank: int, channels: int) -> np.ndarray | str:
    """The constant that the first node's output (rank `rank`, `channels` channels on axis 1) is
    multiplied by / added to, if it acts per channel without changing the output's shape."""
    first, op = nodes
    others = [t for t in op.inputs if t is not first.outputs[0]]
    if len(others) != 1:
        return f"{op.op} does not combine the {first.op} output with one other tensor"
    value = model.constant_value(others[0])
    if value is None or value.dtype.kind not in FLOAT_KINDS:
        return f"{op.op} operand is not a float constant"
    if value.ndim > rank:
        return f"{op.op} operand has a higher rank than the {first.op} output"
    padded = (1,) * (rank - value.ndim) + value.shape
    if padded[0] != 1 or any(d != 1 for d in padded[2:]) or padded[1] not in (1, channels):
        return f"{op.op} operand of shape {value.shape} is not per channel"
    return value


def _channel_vector(value: np.ndarray, channels: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.float64).reshape(-1), (channels,))


def _conv_operand(model: Model, nodes: list[gs.Node]) -> np.ndarray | str:
    weights = _conv_weights(model, nodes[0])
    if isinstance(weights, str):
        return weights
    return _affine_operand(model, nodes, weights[0].ndim, weights[0].shape[0])


def _check_conv_affine(model: Model, nodes: list[gs.Node]) -> str | None:
    operand = _conv_operand(model, nodes)
    return operand if isinstance(operand, str) else None


def _rewrite_conv_affine(names: NamePool, model: Model, nodes: list[gs.Node]):
    conv, op = nodes
    weight, bias = _conv_weights(model, conv)
    vector = _channel_vector(_conv_operand(model, nodes), weight.shape[0])
    bias64 = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    if op.op == "Mul":
        new_weight = weight.astype(np.float64)
        new_weight *= vector.reshape((-1,) + (1,) * (weight.ndim - 1))
        return _fused_conv(names, conv, op, new_weight, bias64 * vector, weight.dtype)
    return _fused_conv(names, conv, op, weight, bias64 + vector, weight.dtype)


CONV_MUL = Rule("conv-mul", ("Conv", "Mul"), _check_conv_affine, _rewrite_conv_affine)
CONV_ADD = Rule("conv-add", ("Conv", "Add"), _check_conv_affine, _rewrite_conv_affine)


def _bn_operand(model: Model, nodes: list[gs.Node]) -> np.ndarray | str:
    bn = nodes[0]
    shape = bn.inputs[0].shape
    scale, beta = (model.constant_value(t) for t in bn.inputs[1:3])
    if shape is None or scale is None or beta is None or scale.ndim != 1 or beta.shape != scale.shape:
        return "BatchNormalization input rank or scale/bias unknown"
    if bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) != 1 or len(bn.outputs) > 1:
        return "BatchNormalization is in training mode or not spatial"
    return _affine_operand(model, nodes, len(shape), scale.shape[0])


def _check_bn_affine(model: Model, nodes: list[gs.Node]) -> str | None:
    operand = _bn_operand(model, nodes)
    return operand if isinstance(operand, str) else None


def _rewrite_bn_affine(names: NamePool, model: Model, nodes: list[gs.Node]):
    """BN(x) * k = BN'(x) with scale*k and bias*k; BN(x) + k = BN'(x) with bias + k."""
    bn, op = nodes
    scale, beta = (model.constant_value(t) for t in bn.inputs[1:3])
    vector = _channel_vector(_bn_operand(model, nodes), scale.shape[0])
    scale64, beta64 = scale.astype(np.float64), beta.astype(np.float64)
    new_scale, new_beta = (scale64 * vector, beta64 * vector) if op.op == "Mul" else (scale64, beta64 + vector)
    out = op.outputs[0]
    fused = gs.Node("BatchNormalization", names.fresh(op.name or out.name), attrs=dict(bn.attrs), inputs=[
        bn.inputs[0],
        gs.Constant(names.fresh(f"{out.name}/scale"), c_order(new_scale.astype(scale.dtype))),
        gs.Constant(names.fresh(f"{out.name}/bias"), c_order(new_beta.astype(beta.dtype))),
        *bn.inputs[3:5],
    ], outputs=[gs.Variable(names.fresh(f"{out.name}/fused"), dtype=out.dtype, shape=out.shape)])
    return [fused], fused.outputs[0]


BN_MUL = Rule("bn-mul", ("BatchNormalization", "Mul"), _check_bn_affine, _rewrite_bn_affine)
BN_ADD = Rule("bn-add", ("BatchNormalization", "Add"), _check_bn_affine, _rewrite_bn_affine)


# ---- MatMul + Add -> Gemm ---------------------------------------------------------------------------
GEMM_DTYPES = ("float16", "float32", "float64")


def _check_matmul_add(model: Model, nodes: list[gs.Node]) -> str | None:
    matmul, add = nodes
    x, weight = matmul.inputs[0], matmul.inputs[1]
    if x.shape is None or len(x.shape) != 2:
        return "MatMul input is not known to be 2-D"
    # shape and dtype from the tensor, not its values: decoding a weight makes every save re-encode it
    if not isinstance(weight, gs.Constant) or len(weight.shape) != 2 or str(weight.dtype) not in GEMM_DTYPES:
        return "MatMul weight is not a 2-D float initializer"
    others = [t for t in add.inputs if t is not matmul.outputs[0]]
    bias = model.constant_value(others[0]) if len(others) == 1 else None
    if bias is None or str(bias.dtype) != str(weight.dtype):
        return "Add operand is not a constant of the weight's dtype"
    rows, cols = x.shape[0], weight.shape[1]
    allowed = {(), (1,), (cols,), (1, 1), (1, cols)} | ({(rows, cols), (rows, 1)} if isinstance(rows, int) else set())
    if bias.shape not in allowed:
        return f"bias of shape {bias.shape} does not broadcast to the MatMul output without changing it"
    return None


def _rewrite_matmul_add(names: NamePool, model: Model, nodes: list[gs.Node]):
    matmul, add = nodes
    bias = next(t for t in add.inputs if t is not matmul.outputs[0])
    out = add.outputs[0]
    gemm = gs.Node("Gemm", names.fresh(add.name or out.name), inputs=[matmul.inputs[0], matmul.inputs[1], bias],
                   outputs=[gs.Variable(names.fresh(f"{out.name}/gemm"), dtype=out.dtype, shape=out.shape)])
    return [gemm], gemm.outputs[0]


MATMUL_ADD = Rule("matmul-add", ("MatMul", "Add"), _check_matmul_add, _rewrite_matmul_add)


def _rule_pass(rules: tuple[Rule, ...], needs_shapes: bool = False):
    """The run() of a pass that applies the rules and reports how often each fired."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        first_ops = {rule.ops[0] for rule in rules}
        if not any(n.op in first_ops for n in model.graph.nodes):
            return PassResult(changed=False)
        if needs_shapes and any(n.inputs and n.inputs[0].shape is None for n in model.graph.nodes
                                if n.op in first_ops):
            annotate_shapes(model)
        names = NamePool(model)
        counts = apply_rules(model, [bind_names(rule, names) for rule in rules], ctx)
        return PassResult(changed=any(counts.values()), stats=counts)

    return run


@register("fuse-conv-bn")
class FuseConvBatchNorm(Pass):
    """Fold an inference-mode BatchNormalization into the Conv before it (exact in float64, then cast)."""

    run = _rule_pass((CONV_BN,))


@register("fuse-conv-affine")
class FuseConvAffine(Pass):
    """Fold a Mul or Add by a per-channel constant into the Conv or BatchNormalization before it."""

    run = _rule_pass((CONV_MUL, CONV_ADD, BN_MUL, BN_ADD), needs_shapes=True)


@register("fuse-matmul-add")
class FuseMatMulAdd(Pass):
    """Rewrite MatMul(x, W) + b as Gemm where x is 2-D and W, b are constants that fit Gemm exactly."""

    run = _rule_pass((MATMUL_ADD,), needs_shapes=True)
