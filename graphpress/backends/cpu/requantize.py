"""Requantization epilogues folded into fewer element-wise operations.

After `int8.integer_conv_matmul` and `int8.elementwise_qdq`, the output of a quantized convolution or
matmul goes through

    y = acc * S (+ B)                                  rescale (S per channel or scalar), bias
    y = minimum(maximum(y, a), b)                      ReLU / ReLU6, optional
    q = astype(minimum(maximum(round(y * inv) + zp, lo), hi), int8)       QuantizeLinear
    u = astype(astype(q, int16) + 128, uint8)          optional: the next quads kernel's unsigned input

which is about fifteen vector operations per output vector: in MobileNetV2's expansions (16 input
channels, 96 outputs) more time than the products themselves. This pass rewrites each such chain to

    u = astype(minimum(maximum(round(acc * (S * inv) + B * inv) + zp', LO), HI), dtype)

- the activation clamp merges into the saturation bounds: round is monotone, so
  round(clamp(y, a, b) * inv) == clamp(round(y * inv), round(a * inv), round(b * inv)) exactly;
- the shift to uint8 merges into the zero point and the bounds (integers in float32 are exact);
- the two multiplies and the bias fold into one multiply-add. This one is not bit-exact: S * inv and
  B * inv are rounded once more, which can move a value lying within float error of a rounding tie
  to the neighbouring step, within the one step the int8 path promises (tests/test_cpu_int8.py).

Chains that do not match exactly (other constants, per-channel zero points, a non-positive scale)
are left as they are.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .relax_rewrites import _constant, mutator_pass

_OPS = {name: tvm.ir.Op.get(f"relax.{name}") for name in ("add", "multiply", "maximum", "minimum", "round", "astype")}


def _call(mutator, expr, op: str) -> relax.Call | None:
    """`expr` (or the call a dataflow variable is bound to) if it calls `op`, else None; also None for
    a variable with other uses, whose value must stay computed (folding through it would compute
    the chain twice, in two fused functions)."""
    if isinstance(expr, relax.Var):
        if mutator.uses.get(expr, 0) > 1:
            return None
        expr = mutator.lookup_binding(expr)
    return expr if isinstance(expr, relax.Call) and expr.op == _OPS[op] else None


def _binary(mutator, expr, op: str):
    """(x, constant value) when `expr` is `op(x, constant)`, else None."""
    call = _call(mutator, expr, op)
    if call is None:
        return None
    const = _constant(mutator, call.args[1])
    return (call.args[0], const.value.numpy()) if const is not None else None


def _scalar_binary(mutator, expr, op: str):
    """(x, c as float) when `expr` is `op(x, c)` with a scalar (single-element) constant c, else None."""
    found = _binary(mutator, expr, op)
    if found is None or found[1].size != 1:
        return None
    return found[0], float(found[1].reshape(-1)[0])


def _clamped(mutator, expr):
    """(x, low, high) for minimum(maximum(x, low), high) with scalar bounds (or maximum alone: high
    = +inf), else None."""
    high = np.inf
    outer = _scalar_binary(mutator, expr, "minimum")
    if outer is not None:
        expr, high = outer
    elif _binary(mutator, expr, "minimum") is not None:  # a per-channel bound
        return None
    inner = _scalar_binary(mutator, expr, "maximum")
    return None if inner is None else (inner[0], inner[1], high)


def _saturated_rounding(mutator, expr):
    """(rounded argument, zero point, low, high) for minimum(maximum(round(z) + zp, lo), hi)."""
    clamp = _clamped(mutator, expr)
    if clamp is None or not np.isfinite(clamp[2]):
        return None
    shifted = _scalar_binary(mutator, clamp[0], "add")
    rounded = _call(mutator, shifted[0], "round") if shifted is not None else None
    if rounded is None:
        return None
    return rounded.args[0], shifted[1], clamp[1], clamp[2]


def _use_counts(mod: tvm.IRModule) -> dict:
    """{variable: number of bindings and function results that use it} over `mod`'s Relax functions."""
    uses: dict = {}
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        values = [binding.value for block in func.body.blocks for binding in block.bindings] + [func.body.body]
        for value in values:
            for var in relax.analysis.free_vars(value):
                uses[var] = uses.get(var, 0) + 1
    return uses


@relax.expr_functor.mutator
class _FoldRequantize(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.uses = _use_counts(mod)

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op != _OPS["astype"] or str(call.attrs.dtype) not in ("int8", "uint8"):
            return call
        dtype, shift, source = str(call.attrs.dtype), 0.0, call.args[0]
        widened = _scalar_binary(self, source, "add")  # astype(astype(astype(c, int8), int16) + 128, uint8)
        if dtype == "uint8" and widened is not None and widened[1] == 128:
            to_int16 = _call(self, widened[0], "astype")
            to_int8 = _call(self, to_int16.args[0], "astype") if to_int16 is not None else None
            if to_int8 is None or str(to_int16.attrs.dtype) != "int16" or str(to_int8.attrs.dtype) != "int8":
                return call
            shift, source = 128.0, to_int8.args[0]
        saturation = _saturated_rounding(self, source)
        if saturation is None:
            return call
        z, zero_point, low, high = saturation
        z, low, high = self._merge_activation(z, zero_point, low, high)
        if low > high:
            return call
        shifted = relax.op.round(self._fold_scales(z))
        if zero_point + shift != 0:
            shifted = relax.op.add(shifted, relax.const(zero_point + shift, "float32"))
        clamped = relax.op.minimum(relax.op.maximum(shifted, relax.const(low + shift, "float32")),
                                   relax.const(high + shift, "float32"))
        return relax.op.astype(clamped, dtype)

    def _merge_activation(self, z, zero_point: float, low: float, high: float):
        """z = clamp(y, a, b) * inv with inv > 0 -> (y * inv, saturation bounds narrowed by the clamp)."""
        scaled = _scalar_binary(self, z, "multiply")
        if scaled is None or scaled[1] <= 0:
            return z, low, high
        inverse = np.float32(scaled[1])
        clamp = _clamped(self, scaled[0])
        if clamp is None:
            return z, low, high
        y, a, b = clamp
        low = max(low, float(np.round(np.float32(a) * inverse)) + zero_point)
        if np.isfinite(b):
            high = min(high, float(np.round(np.float32(b) * inverse)) + zero_point)
        return relax.op.multiply(y, relax.const(inverse, "float32")), low, high

    def _fold_scales(self, z):
        """(x * S + B) * inv or x * S * inv with constant S, B and scalar inv -> x * (S * inv) (+ B * inv)."""
        scaled = _scalar_binary(self, z, "multiply")
        if scaled is None:
            return z
        inverse = np.float32(scaled[1])
        bias = _binary(self, scaled[0], "add")
        product = _binary(self, bias[0] if bias is not None else scaled[0], "multiply")
        if product is None:
            return z
        x, scale = product
        result = relax.op.multiply(x, relax.const((scale * inverse).astype(np.float32), "float32"))
        if bias is not None:
            result = relax.op.add(result, relax.const((bias[1] * inverse).astype(np.float32), "float32"))
        return result


def fold_requantize():
    """Pass: rescale, bias, activation, QuantizeLinear (and the uint8 shift) as one multiply-add,
    round, add and one clamp before the cast."""
    return mutator_pass(_FoldRequantize, "FoldRequantize")
