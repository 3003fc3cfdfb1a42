"""QDQ -> integer arithmetic: Conv / MatMul / Gemm on DequantizeLinear inputs computed in int32.

TVM's ONNX importer turns a QDQ model into float fake-quantization: every DequantizeLinear becomes
`R.dequantize` and the Conv/MatMul run in float32 on the dequantized values, which is slower than
the float model. This rewrite (on the imported Relax module, before layout conversion and fusion)
replaces each

    conv2d(dequantize(xq, sx, zx), dequantize(Wq, sw, 0))          (matmul likewise)

by the exact integer computation

    acc = conv2d(int16(xq) - zx, int16(Wq), out_dtype="int32")      # exact: no rounding at all
    conv2d(...) == float(acc) * (sx * sw)                            # one multiply, per output channel

Subtracting the activation zero point before the convolution keeps zero padding exact (a padded 0
is the real value 0, as in ONNX) and needs no correction terms; int16 holds xq - zx for int8 and
uint8 activations, and LLVM lowers the int16 x int16 -> int32 products to `vpmaddwd` (AVX2) or
`vpdpwssd` (AVX-512 VNNI). The bias add, ReLU/Clip, residual Add and the following QuantizeLinear are
element-wise, so FuseOps puts them into the convolution's epilogue: the requantization
(scale, round half to even, zero point, saturate) runs per register tile in float32, as
onnxruntime's QLinearConv does, and only int8 tensors travel between layers.

Applied to matmuls (also on a transposed weight, Gemm's transB) and to convolutions with groups = 1
(see `_has_integer_kernel`; an odd number of input channels, an RGB stem, is padded to a multiple of
4 with the zero point), where the weight is a constant with zero zero-point (symmetric, per tensor or
per output channel) and the activation has one scale and zero point. Depthwise convolutions with a
constant weight take the same form with float accumulation:

    conv2d(narrow(xq - zx), float(Wq), out_dtype="float32") * (sx * sw)

where the integer products and their sums are exact in float32 (checked per layer,
`_exact_in_float32`), and the input stays one byte per element between layers (uint8 for ReLU
outputs quantized with zero point -128); `schedules.depthwise` shares each loaded and converted input column between neighbouring pixels.
Matmuls of two activations (attention) have no constant weight to pack for the dot-product
instructions; where their sums are as well bounded (`_matmul_exact_in_float32`) they are float32
matmuls on the integers, the same exact result as the int16 path, five times as fast.
Anything else stays float (ONNX's float semantics on the dequantized values), logged at debug.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from .relax_rewrites import mutator_pass

log = logging.getLogger(__name__)

_DEQUANTIZE = tvm.ir.Op.get("relax.dequantize")
_QUANTIZE = tvm.ir.Op.get("relax.quantize")
_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE_DIMS = tvm.ir.Op.get("relax.permute_dims")
_INTEGER = ("int8", "uint8")


def _value(mutator, expr):
    """The expression a dataflow variable is bound to (or `expr` itself)."""
    if isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        return bound if bound is not None else expr
    return expr


def _const(mutator, expr) -> np.ndarray | None:
    expr = _value(mutator, expr)
    return expr.value.numpy() if isinstance(expr, Constant) else None


class _Operand:
    """One dequantized input: its integer tensor (constant or not), scale and zero point."""

    def __init__(self, data, data_const, scale, zero_point, axis):
        self.data, self.data_const = data, data_const
        self.scale, self.zero_point, self.axis = scale, zero_point, axis

    def as_int16(self) -> relax.Expr:
        """int16(q) - zero_point: the real value divided by the scale, exactly."""
        if self.data_const is not None:
            shape = [1] * self.data_const.ndim
            if self.zero_point.size > 1:
                shape[self.axis] = -1
            zero_point = self.zero_point.astype(np.int16).reshape(shape)
            return relax.const(self.data_const.astype(np.int16) - zero_point, "int16")
        return self._activation_in("int16")

    def as_exact_floats(self) -> relax.Expr:
        """float32(q) - zero_point for an activation: the same integers as `as_int16`, in float32."""
        return self._activation_in("float32")

    def _activation_in(self, dtype: str) -> relax.Expr:
        """An activation's q - zero_point (one zero point) computed in `dtype`, which holds it exactly."""
        shifted = relax.op.astype(self.data, dtype)
        if np.any(self.zero_point != 0):
            shifted = relax.op.subtract(shifted, relax.const(self.zero_point.astype(dtype).reshape(()), dtype))
        return shifted

    def with_channels(self, multiple: int) -> "_Operand":
        """This NCHW activation / OIHW weight with axis 1 padded to a multiple of `multiple`, holding
        the zero point there: q - zero_point = 0 in the new channels, so they add nothing to a
        convolution. Odd channel counts (a 3-channel stem) then take the integer kernels, which
        reduce over channel pairs or quads."""
        # (per-channel zero points other than 0 are refused later, see `_output_scale`)
        zero_point = self.zero_point.reshape(-1)[0] if self.zero_point.size == 1 else 0
        channels = int(self.data.ty.shape.values[1])
        extra = -channels % multiple
        if self.data_const is not None:
            widths = [(0, 0), (0, extra)] + [(0, 0)] * (self.data_const.ndim - 2)
            data = np.pad(self.data_const, widths, constant_values=zero_point)
            return _Operand(relax.const(data, str(data.dtype)), data, self.scale, self.zero_point, self.axis)
        rank = len(self.data.ty.shape.values)
        padded = relax.op.nn.pad(self.data, [0, 0, 0, extra] + [0, 0] * (rank - 2), pad_value=float(zero_point))
        return _Operand(padded, None, self.scale, self.zero_point, self.axis)

    def as_narrow_integer(self) -> relax.Expr:
        """q - zero_point in the narrowest type that holds it: q itself for a zero point of 0, uint8
        for int8 with zero point -128 (activations after ReLU / ReLU6), int16 otherwise.

        A convolution that accumulates in float reads this tensor with a conversion per load; the
        layer before it writes it in its epilogue, so one byte per element travels between them
        instead of the four of a dequantized float (MobileNetV2: every expansion feeds a depthwise
        convolution, 112x112x96 at the widest)."""
        zero_point = int(self.zero_point.reshape(-1)[0])
        if zero_point == 0:
            return self.data
        if zero_point == -128 and str(self.data.ty.dtype) == "int8":
            return relax.op.astype(relax.op.add(relax.op.astype(self.data, "int16"), relax.const(128, "int16")), "uint8")
        return self.as_int16()

    def integer_values(self) -> np.ndarray:
        """A constant's q - zero_point (int32), the zero point broadcast along `axis`."""
        shape = [1] * self.data_const.ndim
        if self.zero_point.size > 1:
            shape[self.axis] = -1
        return self.data_const.astype(np.int32) - self.zero_point.astype(np.int32).reshape(shape)

    def as_integer_floats(self) -> relax.Expr:
        """A constant's q - zero_point as float32: integer products that float sums hold exactly
        (up to 2^24, see `_exact_in_float32`)."""
        return relax.const(self.integer_values().astype(np.float32), "float32")

    def largest_magnitude(self) -> int:
        """The largest |q - zero_point| the data type allows: any value of it may arrive at run time."""
        info = np.iinfo(str(self.data.ty.dtype))
        return int(np.max(np.maximum(np.abs(info.min - self.zero_point), np.abs(info.max - self.zero_point))))


def _dequantized(mutator, expr) -> _Operand | None:
    """`expr` as a dequantize of int8/uint8 data with constant scale and zero point, else None.

    A transposed dequantized constant (Gemm with transB=1 imports as matmul(x, permute_dims(W))) is
    the dequantize of the transposed constant, with the scale's axis moved along."""
    call = _value(mutator, expr)
    if isinstance(call, relax.Call) and call.op == _PERMUTE_DIMS:
        inner = _dequantized(mutator, call.args[0])
        if inner is None or inner.data_const is None:
            return None
        axes = list(range(inner.data_const.ndim))[::-1] if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
        data = np.ascontiguousarray(np.transpose(inner.data_const, axes))
        axis = axes.index(inner.axis % inner.data_const.ndim)
        return _Operand(relax.const(data, str(data.dtype)), data, inner.scale, inner.zero_point, axis)
    if not isinstance(call, relax.Call) or call.op != _DEQUANTIZE:
        return None
    data, scale, zero_point = call.args
    if str(data.ty.dtype) not in _INTEGER:
        return None
    scale, zero_point = _const(mutator, scale), _const(mutator, zero_point)
    if scale is None or zero_point is None:
        return None
    return _Operand(data, _const(mutator, data), scale.astype(np.float32), zero_point.astype(np.int32),
                    int(call.attrs.axis))


@relax.expr_functor.mutator
class _IntegerRewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op not in (_CONV2D, _MATMUL) or str(call.ty.dtype) != "float32":
            return call
        integer = _has_integer_kernel(call)
        a, b = (_dequantized(self, arg) for arg in call.args[:2])
        if not integer and _odd_channels(call) and a is not None and b is not None and b.data_const is not None:
            a, b, integer = a.with_channels(CHANNEL_MULTIPLE), b.with_channels(CHANNEL_MULTIPLE), True
        depthwise = not integer and _depthwise(call) and a is not None and b is not None and b.data_const is not None
        if depthwise and not _exact_in_float32(a, b):
            log.debug("int8: depthwise %s keeps float: its integer sums may exceed 2^24", call.op.name)
            depthwise = False
        if a is None or b is None or not (integer or depthwise):
            log.debug("int8: %s keeps float: no integer kernel, or an input is not a constant-scale "
                      "DequantizeLinear", call.op.name)
            return call
        scale = _output_scale(call, a, b)
        if scale is None or (a.data_const is None and a.zero_point.size != 1):
            log.debug("int8: %s keeps float: per-channel activation or weight zero point", call.op.name)
            return call
        if not integer:
            acc = _conv2d(call, a.as_narrow_integer(), b.as_integer_floats(), "float32")
        elif call.op == _MATMUL and b.data_const is None and _matmul_exact_in_float32(call, a, b):
            acc = relax.op.matmul(a.as_exact_floats(), b.as_exact_floats(), out_dtype="float32")
        elif call.op == _MATMUL:
            acc = relax.op.astype(relax.op.matmul(a.as_int16(), b.as_int16(), out_dtype="int32"), "float32")
        else:
            acc = relax.op.astype(_conv2d(call, a.as_int16(), b.as_int16(), "int32"), "float32")
        return relax.op.multiply(acc, relax.const(scale, "float32"))


#: odd input channel counts of convolutions are padded to a multiple of this (channel quads)
CHANNEL_MULTIPLE = 4


def _odd_channels(call) -> bool:
    """A convolution with groups = 1 and an odd number of input channels (RGB stems)."""
    return (call.op == _CONV2D and int(call.attrs.groups) == 1 and call.attrs.kernel_layout == "OIHW"
            and call.attrs.data_layout == "NCHW" and int(call.args[1].ty.shape.values[1]) % 2 == 1)


def _depthwise(call) -> bool:
    """A convolution with one input channel per group (NCHW data, as imported).

    Only these take the narrow integer input: their loads are whole channel vectors, converted
    once per vector. Convolutions reducing over input channels broadcast one scalar per load, and a
    converted scalar costs more than the bytes it saves (MobileNetV2's 3-channel stem: 0.25 -> 0.37 ms;
    its depthwise convolutions on one-byte inputs: 4.94 -> 4.72 ms for the whole model).
    """
    groups = int(call.attrs.groups)
    return groups > 1 and groups == int(call.args[0].ty.shape.values[1])


#: float32 holds every integer of at most this magnitude exactly
FLOAT32_EXACT = 2 ** 24


def _exact_in_float32(a: _Operand, b: _Operand) -> bool:
    """Whether a depthwise convolution's float32 sums of (xq - zx) * (wq - zw) are exact: every
    partial sum is at most the largest |xq - zx| times the largest per-channel sum of |wq - zw|.

    3x3 int8 kernels stay below 2^19; about 520 full-range taps (a 23x23 kernel) could exceed 2^24,
    and such a convolution keeps float arithmetic on the dequantized values.
    """
    weights = np.abs(b.integer_values().astype(np.int64))
    per_channel = weights.reshape(weights.shape[0], -1).sum(axis=1)
    return a.largest_magnitude() * int(per_channel.max()) <= FLOAT32_EXACT


def _matmul_exact_in_float32(call, a: _Operand, b: _Operand) -> bool:
    """Whether an activation x activation matmul's float32 sums of integer products are exact: the
    reduction length times the largest |q - zero_point| of each operand is at most 2^24.

    Attention's two matmuls (MiniLM: K = 32 and 128, at most 128 x 255 x 255 < 2^23) then run as float
    matmuls on the integers, exactly: with no constant weight to pack they took the int16 path, whose
    widening multiplies ran at ~20 GMAC/s (0.3 ms each, 1.8 ms of MiniLM's int8 11 ms)."""
    depth = int(call.args[0].ty.shape.values[-1])
    return depth * a.largest_magnitude() * b.largest_magnitude() <= FLOAT32_EXACT


def _conv2d(call, data: relax.Expr, weight: relax.Expr, out_dtype: str) -> relax.Expr:
    """`call`'s convolution on other operands, accumulating in `out_dtype`."""
    attrs = call.attrs
    return relax.op.nn.conv2d(data, weight, attrs.strides, attrs.padding, attrs.dilation, attrs.groups,
                              attrs.data_layout, attrs.kernel_layout, attrs.out_layout, out_dtype=out_dtype)


def _has_integer_kernel(call) -> bool:
    """Matmuls, and convolutions that reduce over an even number of channels (`pairs` packs them two
    by two for `vpmaddwd`). Depthwise and odd-channel convolutions accumulate in float instead (as
    int32 products they would need `vpmulld`, slower than float FMA): depthwise ones on the narrow
    integer input (`_Operand.as_narrow_integer`) converted inside the kernel, the others on the
    dequantized float input."""
    if call.op == _MATMUL:
        return True
    weight = call.args[1].ty.shape.values
    return int(call.attrs.groups) == 1 and int(weight[1]) % 2 == 0 and call.attrs.kernel_layout == "OIHW"


def _output_scale(call, a: _Operand, b: _Operand) -> np.ndarray | None:
    """sx * sw broadcast to the output: a scalar, or per output channel (conv axis 1, matmul last axis).

    Weight (second operand) scales may be per output channel; zero points of operands with more
    than one scale must be 0 (symmetric), since a per-channel zero point cannot be subtracted from a
    shared activation before the reduction.
    """
    if a.scale.size != 1 or a.zero_point.size != 1:
        return None
    if b.scale.size == 1:
        return (a.scale.reshape(()) * b.scale.reshape(())).astype(np.float32)
    if np.any(b.zero_point != 0) or b.data_const is None:
        return None
    rank = len(call.ty.shape.values)
    if call.op == _CONV2D:
        if b.axis != 0 or call.attrs.data_layout != "NCHW" or call.attrs.kernel_layout != "OIHW":
            return None
        shape = [1, b.scale.size] + [1] * (rank - 2)
    else:
        if b.axis not in (b.data_const.ndim - 1, -1):
            return None
        shape = [b.scale.size]
    return (a.scale.reshape(()) * b.scale).reshape(shape).astype(np.float32)


@relax.expr_functor.mutator
class _ElementwiseQDQ(relax.PyExprMutator):
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op not in (_QUANTIZE, _DEQUANTIZE) or isinstance(_value(self, call.args[0]), Constant):
            return call
        scale, zero_point = _const(self, call.args[1]), _const(self, call.args[2])
        if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
            return call
        scale = relax.const(scale.astype(np.float32).reshape(()), "float32")
        zero = relax.const(zero_point.astype(np.float32).reshape(()), "float32")
        if call.op == _DEQUANTIZE:
            return relax.op.multiply(relax.op.subtract(relax.op.astype(call.args[0], "float32"), zero), scale)
        dtype = str(call.attrs.out_dtype)
        info = np.iinfo(dtype)
        # x * (1/s) instead of x / s: a division per element costs more than the whole convolution
        # epilogue otherwise; the two differ only where x / s lands exactly between two integers
        reciprocal = relax.const(np.float32(1) / scale.value.numpy(), "float32")
        rounded = relax.op.add(relax.op.round(relax.op.multiply(call.args[0], reciprocal)), zero)
        low, high = (relax.const(float(v), "float32") for v in (info.min, info.max))
        # maximum/minimum rather than R.clip: ConvertLayout has no layout rule for clip
        return relax.op.astype(relax.op.minimum(relax.op.maximum(rounded, low), high), dtype)


def integer_conv_matmul():
    """Pass: conv2d / matmul on dequantized int8 inputs -> int16 x int16 -> int32 with a float rescale."""
    return mutator_pass(_IntegerRewriter, "IntegerConvMatmul")


def elementwise_qdq():
    """Pass: per-tensor QuantizeLinear / DequantizeLinear of activations as element-wise Relax ops.

    `R.quantize` / `R.dequantize` have no layout rule, so ConvertLayout would wrap each in NHWC<->NCHW
    transposes, and FuseOps would not put a QuantizeLinear into the convolution epilogue. As multiply
    by the reciprocal scale, round (half to even), add, maximum/minimum and cast they do both. Run
    after `integer_conv_matmul`, which looks for `R.dequantize` on convolution inputs.
    """
    return mutator_pass(_ElementwiseQDQ, "ElementwiseQDQ")
